"""Emit the ONNX artifact: ``torch.onnx.export(dynamo=True)`` of the compiled FX module, plus what is ours.

torch.onnx covers the ops. mpcompiler owns: the precision plan (already in the FX graph: the export
keeps its casts and fp16 initializers), the lowering for ONNX Runtime (a pass pipeline on a copy of the
graph), model input/output names and readable dynamic dims (onnx_io), provenance (every ONNX node
carries the FX node, module path and dtype it came from), the precision summary in the model's
metadata, checking (onnx.checker's full check with shape inference), an atomic write, verification in
ONNX Runtime against fp32 and the FX module (ort_verify), and the deployment handoff file (handoff).
``export_onnx`` runs them in order; the export, provenance, summary and checked save are here.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_ir as ir
import onnxscript.optimizer
import torch
import torch.fx

from mpcompiler import dtypes, fp8
from mpcompiler._version import __version__
from mpcompiler.accuracy import output_names
from mpcompiler.emit_fx import twin
from mpcompiler.errors import ExportError
from mpcompiler.files import ONNX_DUMPS, clear_dumps
from mpcompiler.fused import OPSET_23_OPS, kv_attention, onnx_translations
from mpcompiler.handoff import write_handoff
from mpcompiler.ir import META_KEY, graph_record, module_path
from mpcompiler.onnx_io import GENAI_DIMS, example, name_io, with_pasts
from mpcompiler.ort_verify import DEFAULT_TOLERANCE, check_bf16_nodes, verify_artifact
from mpcompiler.pass_manager import PassManager, progress
from mpcompiler.passes import EliminateCasts, InsertKvCache, LowerFused, LowPrecisionIo

EXTERNAL_DATA_LIMIT = 2**31 - 2**24  # protobuf's 2 GiB, with room for the graph itself
# Opset 23 is the first with an Attention op (SDPA exports as one node, not MatMul/Softmax), but ONNX
# Runtime 1.31's CUDA provider runs opset-23 convolutions with prefer_nhwc 4.6x slower and cannot
# capture them in a CUDA graph (ResNet-50 b128 on an H100: 33.4 ms vs 7.2 ms; docs/perf.md).
ATTENTION_OPSET, BASE_OPSET = 23, 20
_PROVENANCE = "mpcompiler_node"  # key in node.meta["custom"], which survives torch.onnx's re-export


@dataclass(frozen=True)
class OnnxArtifact:
    """What export_onnx wrote and measured."""

    path: Path
    handoff: Path  # the deployment team's markdown; its JSON twin is beside it
    external_data: Path | None
    verified_with: str | None  # ONNX Runtime provider, or None if not verified
    error_vs_fp32: dict[str, float]
    error_vs_fx: dict[str, float]


def export_onnx(
    compiled,
    path,
    *,
    opset: int | None = None,
    target: str = "ort-cuda",
    io_dtype: str | torch.dtype | None = None,
    padding: str = "any",
    external_data: bool | None = None,
    verify: str = "error",
    tolerance: float = DEFAULT_TOLERANCE,
    providers: list[str] | None = None,
) -> OnnxArtifact:
    """Write the compiled model as ONNX for ONNX Runtime, with its handoff file; verify it.

    Called as ``compiled.export_onnx(path, ...)``.

    Args:
        path: the ``.onnx`` file to write (atomically; ``<path>.md`` and ``<path>.json`` go beside it).
        opset: the ONNX opset. Default: 23 if the model has attention (one ``Attention`` node, or
            GroupQueryAttention), an RMSNorm or BERT-style embeddings (EmbedLayerNormalization), else 20
            (ONNX Runtime's CUDA provider runs opset-23 convolutions slower).
        target: ``"ort-cuda"`` or ``"ort-cpu"``: the fused ops emitted are those the target has
            kernels for (``mpcompiler.fused.KERNELS``); either artifact runs on either provider.
        io_dtype: ``"float16"`` for fp16 float inputs and outputs; default: the model's (fp32).
        padding: ``"any"`` (default): attention takes its mask whole, exact for any padding.
            ``"right"``: the artifact's contract is right padding (each row's ones first, as BERT's
            tokenizers pad): attention reads only each row's length, ONNX Runtime's 1-D mask index,
            with which its CUDA provider runs fused attention kernels (docs/onnx.md).
        external_data: weights in ``<path>.data``; default: only when they pass 2 GB.
        verify: run the artifact in ONNX Runtime on the held-out samples and compare with fp32 and
            the FX module: ``"error"`` (default) raises past ``tolerance``, ``"warn"`` warns, ``"off"``
            skips.
        tolerance: the relative L2 error accepted beyond the FX module's own error vs fp32, against fp32
            and against the FX module (two computations of one plan round differently: ort_verify.py).
        providers: ONNX Runtime providers to verify with (default: CUDA if present, else CPU).
    """
    if verify not in ("error", "warn", "off"):
        raise ExportError(f"verify={verify!r}: use 'error', 'warn' or 'off'")
    if target not in ("ort-cuda", "ort-cpu"):
        raise ExportError(f"target={target!r}: use 'ort-cuda' or 'ort-cpu'")
    if padding not in ("any", "right"):
        raise ExportError(f"padding={padding!r}: use 'any' or 'right'")
    if padding == "right" and compiled.lm is not None:  # was accepted, changed nothing and told the README "right"
        raise ExportError(
            "padding='right' is an encoder's contract (each row's tokens first, its mask read as a length); a causal "
            "LM's artifact takes its prompts left-padded, as compiled.generate() does: leave padding='any'"
        )
    path = Path(path)
    if path.is_dir():  # found before the export's minutes, not by the final move
        raise ExportError(f"{path} is a folder: give the .onnx file's path in it, e.g. {path / 'model.onnx'}")
    gm = compiled.graph_module
    if verify != "off":
        check_bf16_nodes(gm, providers)
    io = _io_dtype(io_dtype, graph_record(gm).dtype)
    program = twin(gm, "MpCompiledModuleONNX")
    passes = [
        *([LowPrecisionIo(dtype=io), EliminateCasts()] if io is not None else []),
        # a causal LM: one prefill/decode step with the KV cache as inputs and outputs
        *([InsertKvCache(**compiled.lm.__dict__, cache="io")] if compiled.lm is not None else []),
        LowerFused(target=target, padding=padding),
    ]
    dump_dir = compiled.options.dump_dir
    if dump_dir is not None:
        clear_dumps(dump_dir, (ONNX_DUMPS,))  # an earlier export's, perhaps of other passes
    folder = dump_dir / "onnx" if dump_dir is not None else None
    PassManager(passes, dump_dir=folder, debug=compiled.options.debug).run(program)
    if opset is None:
        needs_23 = OPSET_23_OPS | {kv_attention}  # kv_attention: SDPA when not lowered to GroupQueryAttention
        opset = ATTENTION_OPSET if any(n.target in needs_23 for n in program.graph.nodes) else BASE_OPSET
    # our fused ops' translations are written in opset 23 (SDPA's alone falls back to torch.onnx's own below it)
    newer = sorted(
        {n.target.name() for n in program.graph.nodes if n.target in OPSET_23_OPS and n.target.namespace != "aten"}
    )
    if opset < ATTENTION_OPSET and newer:
        raise ExportError(
            f"opset={opset}: the artifact's fused ops {newer} are written with opset-{ATTENTION_OPSET} ops; pass "
            f"opset={ATTENTION_OPSET} or leave opset unset"
        )
    args, kwargs = example(compiled, io)
    dynamic_shapes = graph_record(gm).dynamic_shapes
    if compiled.lm is not None:
        kwargs, dynamic_shapes = with_pasts(program, kwargs, dynamic_shapes)
    with progress(what=f"ONNX export of {path.name}", total=3 if verify != "off" else 2, unit="stage") as stages:
        stages.set_postfix_str("torch.onnx.export")
        onnx_program = _export(program, args, kwargs, dynamic_shapes, opset)
        stages.update()
        stages.set_postfix_str("save and check")
        model = onnx_program.model
        name_io(model, output_names(program), GENAI_DIMS if compiled.lm is not None else {})
        _annotate(model, onnx_program.exported_program, program, compiled.report, io, tolerance)
        model.metadata_props["mpcompiler.padding"] = padding
        if external_data is None:
            external_data = sum(t.nbytes for t in gm.state_dict().values()) > EXTERNAL_DATA_LIMIT

        # Written, checked and verified in a folder beside path; moved into place only when all passed.
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            files = _save_checked(model, tmp / path.name, external_data)
            stages.update()
            stages.set_postfix_str("verify in ONNX Runtime")
            provider, errors_fp32, errors_fx = None, {}, {}
            if verify != "off":
                provider, errors_fp32, errors_fx = verify_artifact(
                    compiled, program, tmp / path.name, io, providers, tolerance, verify, padding, name=path
                )
            for f in reversed(files):  # the weights first, the model that points at them last
                f.replace(path.parent / f.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    handoff = write_handoff(path, model, compiled, provider, errors_fp32, errors_fx, io, opset, padding)
    data_path = path.parent / files[1].name if len(files) > 1 else None
    return OnnxArtifact(path, handoff, data_path, provider, errors_fp32, errors_fx)


def _io_dtype(io_dtype, plan_dtype: torch.dtype) -> torch.dtype | None:
    if io_dtype is None:
        return None
    dtype = dtypes.parse(io_dtype)
    if dtype != torch.float16 or plan_dtype != torch.float16:
        raise ExportError(f"io_dtype={io_dtype!r}: only 'float16' I/O is supported, for a float16 plan")
    return dtype


def _export(gm: torch.fx.GraphModule, args, kwargs, dynamic_shapes, opset):
    for node in gm.graph.nodes:
        if node.op == "call_function":
            node.meta["custom"] = {**node.meta.get("custom", {}), _PROVENANCE: node.name}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                gm,
                args,
                kwargs=kwargs,
                dynamic_shapes=dynamic_shapes,
                dynamo=True,
                opset_version=opset,
                custom_translation_table=onnx_translations(opset) | {fp8.SCALED_MM: fp8.scaled_mm_onnx},
                optimize=False,
                verbose=False,
            )
    except Exception as exc:
        raise _export_error(gm, exc) from exc
    # Constant folding and cleanup, as optimize=True does, but not onnxscript's opset-23 fusions: the
    # fusions are ours to choose (lower_fused). Its RMSNormalization rule mis-types a norm whose
    # statistics the plan keeps fp32 (T5), and its GQA rule writes an Attention that ONNX Runtime
    # 1.31's CUDA provider refuses.
    onnxscript.optimizer.optimize(program.model)
    _drop_unused_outputs(program.model.graph)
    return program


def _drop_unused_outputs(graph: ir.Graph) -> None:
    """Rebuild each contrib op whose trailing optional outputs nothing reads without them. ONNX Runtime
    allocates every declared output and picks its kernel by which exist: its CUDA ``Attention`` runs
    cuDNN's flash attention only without ``present`` (contrib_ops/cuda/bert/attention.cc), which
    torch.onnx declares from the schema whether read or not. Required outputs stay (EmbedLayerNormalization's
    mask_index)."""
    optional = onnx.defs.OpSchema.FormalParameterOption.Optional
    for node in list(graph):
        if node.domain != "com.microsoft":
            continue
        known = onnx.defs.has(node.op_type, node.domain)
        outputs = onnx.defs.get_schema(node.op_type, 1, node.domain).outputs if known else []
        required = sum(o.option != optional for o in outputs)
        read = [bool(v.uses()) or v.is_graph_output() for v in node.outputs]
        keep = len(read)
        while keep > max(required, 1) and not read[keep - 1]:
            keep -= 1
        if keep == len(node.outputs):
            continue
        lean = ir.Node(
            node.domain, node.op_type, node.inputs, node.attributes.values(), num_outputs=keep, name=node.name,
            metadata_props=dict(node.metadata_props),
        )  # fmt: skip
        ir.convenience.replace_nodes_and_values(graph, node, [node], [lean], node.outputs[:keep], lean.outputs)


def _export_error(gm: torch.fx.GraphModule, exc: Exception) -> ExportError:
    """Name the op torch.onnx could not translate (or whose translation failed), and where it sits."""
    text = str(exc)
    missing = re.search(r"No ONNX function found for <OpOverload\(op='([\w.]+)', overload='(\w+)'", text)
    failed = re.search(r"Error when translating node %(\w+) .*?target=torch\.ops\.([\w.]+)", text)
    match = missing or failed
    if match:
        qualname = f"{match.group(1)}.{match.group(2)}" if missing else match.group(2)
        paths = sorted({module_path(n) or "top level" for n in gm.graph.nodes if str(n.target) == qualname})
        where = f" at {', '.join(paths)}" if paths else ""
        if missing:
            return ExportError(
                f"ONNX export: torch.onnx has no translation for op {qualname}{where}. Register one with "
                "torch.onnx.export(custom_translation_table=...) or keep the op out of the model."
            )
        cause = exc.__cause__ or exc
        while cause.__cause__ is not None:  # the innermost exception says what went wrong
            cause = cause.__cause__
        return ExportError(
            f"ONNX export: translating %{match.group(1)} (op {qualname}{where}) failed: "
            f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
        )
    summary = text.split("## Exception summary")[-1].strip().splitlines()
    return ExportError(f"ONNX export failed: {type(exc).__name__}: {' '.join(summary[:3])}")


def _annotate(model: ir.Model, exported, gm, report, io, tolerance) -> None:
    """Provenance on every node, the precision summary on the model."""
    by_export_name = {n.name: n.meta.get("custom", {}).get(_PROVENANCE) for n in exported.graph.nodes}
    ours = {n.name: n for n in gm.graph.nodes}
    for node in model.graph:
        fx = dict(node.metadata_props).get("pkg.torch.onnx.fx_node", "")
        m = re.match(r"%(\w+)", fx)
        source = ours.get(by_export_name.get(m.group(1)) if m else None)
        if source is None:
            continue
        rec = source.meta[META_KEY]
        node.metadata_props["mpcompiler.fx_node"] = source.name
        node.metadata_props["mpcompiler.module_path"] = rec.module_path
        node.metadata_props["mpcompiler.dtype"] = dtypes.short(rec.dtype)
        if rec.reason:
            node.metadata_props["mpcompiler.reason"] = rec.reason
    summary = {
        "mpcompiler.version": __version__,
        "mpcompiler.dtype": report.dtype,
        "mpcompiler.io_dtype": str(io).removeprefix("torch.") if io else "as the model",
        "mpcompiler.ops_per_dtype": json.dumps(report.counts()),
        "mpcompiler.compute_ops_per_dtype": json.dumps(report.counts("low")),
        "mpcompiler.casts": str(report.casts()),
        "mpcompiler.calibration_samples": str(report.calib_samples),
        "mpcompiler.tolerance": f"{tolerance:g}",
        "mpcompiler.fx_error_vs_fp32": json.dumps(report.accuracy.to_dict() if report.accuracy else None),
    }
    model.metadata_props.update(summary)
    model.producer_name = "mpcompiler"
    model.producer_version = __version__


def _save_checked(model: ir.Model, path: Path, external: bool) -> list[Path]:
    """Save ``model`` (weights in ``<path>.data`` if ``external``) and run onnx.checker's full check,
    which includes strict shape inference. Returns the files written, the model first."""
    data_name = f"{path.name}.data" if external else None
    ir.save(model, path, external_data=data_name)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise ExportError(f"the exported ONNX model fails onnx.checker's full check: {exc}") from exc
    return [path, path.with_name(data_name)] if data_name else [path]
