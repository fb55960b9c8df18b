"""Emit the ONNX artifact: ``torch.onnx.export(dynamo=True)`` of the compiled FX module, plus what is ours.

torch.onnx covers the ops. mpcompiler owns: the precision plan (already in the FX graph: the export
keeps its casts and fp16 initializers), the lowering for ONNX Runtime (a pass pipeline on a copy of the
graph), model input/output names and readable dynamic dims (onnx_io), provenance (every ONNX node
carries the FX node, module path and dtype it came from), the precision summary in the model's
metadata, checking (onnx.checker's full check with shape inference), an atomic write, verification in
ONNX Runtime against fp32 and the FX module (ort_verify), and the deployment handoff file.
``export_onnx`` runs them in order; the export, provenance, summary, checked save and handoff are here.
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

from mpcompiler import dtypes
from mpcompiler._version import __version__
from mpcompiler.accuracy import output_names
from mpcompiler.emit_fx import twin
from mpcompiler.errors import ExportError
from mpcompiler.files import ONNX_DUMPS, clear_dumps, write_atomic
from mpcompiler.fused import OPSET_23_OPS, kv_attention, onnx_translations
from mpcompiler.ir import META_KEY, graph_record, module_path
from mpcompiler.onnx_io import GENAI_DIMS, example, name_io, with_pasts
from mpcompiler.ort_verify import DEFAULT_TOLERANCE, check_bf16_nodes, import_onnxruntime, verify_artifact
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
            GroupQueryAttention) or an RMSNorm, else 20 (ONNX Runtime's CUDA provider runs opset-23
            convolutions slower).
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
        tolerance: the relative L2 error accepted, vs fp32 and vs the FX module.
        providers: ONNX Runtime providers to verify with (default: CUDA if present, else CPU).
    """
    if verify not in ("error", "warn", "off"):
        raise ExportError(f"verify={verify!r}: use 'error', 'warn' or 'off'")
    if target not in ("ort-cuda", "ort-cpu"):
        raise ExportError(f"target={target!r}: use 'ort-cuda' or 'ort-cpu'")
    if padding not in ("any", "right"):
        raise ExportError(f"padding={padding!r}: use 'any' or 'right'")
    path = Path(path)
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
                    compiled, program, tmp / path.name, io, providers, tolerance, verify, padding
                )
            for f in reversed(files):  # the weights first, the model that points at them last
                f.replace(path.parent / f.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    handoff = _write_handoff(path, model, compiled, provider, errors_fp32, errors_fx, io, opset, padding)
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
                custom_translation_table=onnx_translations(opset),
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


def _tensor_info(value: ir.Value) -> dict:
    shape = [d.value if isinstance(d, ir.SymbolicDim) else int(d) for d in (value.shape or ())]
    return {"name": value.name, "dtype": value.dtype.name.lower() if value.dtype else None, "shape": shape}


def _write_handoff(path, model, compiled, provider, vs_fp32, vs_fx, io, opset, padding) -> Path:
    inputs = [_tensor_info(v) for v in model.graph.inputs]
    outputs = [_tensor_info(v) for v in model.graph.outputs]
    report = compiled.report
    info = {
        "model_file": path.name,
        "opset": opset,
        "inputs": inputs,
        "outputs": outputs,
        "dynamic_axes": {
            v["name"]: {k: d for k, d in enumerate(v["shape"]) if isinstance(d, str)} for v in inputs + outputs
        },
        "precision": {
            "dtype": report.dtype,
            "io_dtype": str(io).removeprefix("torch.") if io else "as the model (float32 / int64)",
            "ops_per_dtype": report.counts(),
            "casts": report.casts(),
            "calibration_samples": report.calib_samples,
        },
        "verified_with": {
            "onnxruntime": import_onnxruntime().__version__,
            "provider": provider,
            "samples": len(compiled.val_samples),
            "held_out": report.accuracy.held_out if report.accuracy else None,
        }
        if provider
        else None,
        "padding": "right: each row's attention_mask ones first; attention reads each row's length only"
        if padding == "right"
        else "any: attention takes attention_mask whole",
        "error_vs_fp32": vs_fp32,
        "error_vs_fx_module": vs_fx,
        # fastest measured on ONNX Runtime's CUDA provider (docs/perf.md); CUDA graphs need fixed shapes
        "cuda_provider_options": ({} if compiled.lm else {"enable_cuda_graph": "1"})
        | ({"prefer_nhwc": "1"} if any(node.op_type == "Conv" for node in model.graph) else {}),
        "exported_by": {"mpcompiler": __version__, "torch": torch.__version__, "onnx": onnx.__version__},
    }
    if compiled.lm is not None:
        info["generation"] = {
            "kv_cache": "past_key_values.{i}.key/value in, present.{i}.key/value out: [batch, kv_heads, seq, head_dim]",
            "max_seq_compiled_for": compiled.lm.max_seq,
            # GroupQueryAttention takes one buffer as past and present; the plain ops' cache grows a step
            "shared_cache": any(node.op_type == "GroupQueryAttention" for node in model.graph),
        }
    json_path = path.with_name(path.name + ".json")
    write_atomic(json_path, json.dumps(info, indent=1) + "\n")
    md_path = path.with_name(path.name + ".md")
    write_atomic(md_path, _handoff_markdown(info))
    return md_path


def _handoff_markdown(info: dict) -> str:
    def row(v):
        return f"| `{v['name']}` | {v['dtype']} | [{', '.join(map(str, v['shape']))}] |"

    verified = info["verified_with"]
    lines = [
        f"# {info['model_file']}",
        "",
        f"ONNX opset {info['opset']}, exported by mpcompiler {info['exported_by']['mpcompiler']} "
        f"(torch {info['exported_by']['torch']}). Precision: {info['precision']['dtype']} where the plan says, "
        f"fp32 elsewhere; inputs and outputs {info['precision']['io_dtype']}.",
        "",
        "| input | dtype | shape |",
        "| --- | --- | --- |",
        *[row(v) for v in info["inputs"]],
        "",
        "| output | dtype | shape |",
        "| --- | --- | --- |",
        *[row(v) for v in info["outputs"]],
        "",
        f"Padding: {info['padding']}.",
        "",
        "Named dims are dynamic: "
        + (
            ", ".join(f"`{name}`" for name in sorted({d for a in info["dynamic_axes"].values() for d in a.values()}))
            or "none"
        )
        + ".",
        "",
    ]
    if verified:
        errs = ", ".join(f"{k} {v:.2e}" for k, v in info["error_vs_fp32"].items())
        errs_fx = ", ".join(
            f"{k} {v:.0%}" if k == "greedy_agreement" else f"{k} {v:.2e}" for k, v in info["error_vs_fx_module"].items()
        )
        held = "held-out" if verified["held_out"] else "calibration"
        samples = f"{verified['samples']} {held} sample{'s' if verified['samples'] != 1 else ''}"
        lines += [
            f"Verified with ONNX Runtime {verified['onnxruntime']} ({verified['provider']}) on {samples}: "
            f"relative L2 error vs the fp32 model {errs}; vs mpcompiler's FX module {errs_fx}.",
        ]
    else:
        lines.append("Not verified in ONNX Runtime (see the export's warnings).")
    if "generation" in info:
        lines += [
            "",
            "## Generate (ONNX Runtime, CUDA if it has it, else the CPU; the KV cache stays on the device)",
            "",
            "The KV cache is inputs and outputs, as ONNX Runtime GenAI names them: feed each step's `present.*` "
            "back as the next step's `past_key_values.*`, or, with GroupQueryAttention, bind one buffer as both "
            "(it writes in place; the loop below does). Each row's tokens sit at the front of its cache "
            "(ONNX Runtime's GroupQueryAttention layout): prompts are right-padded, `attention_mask` "
            "[batch, past + new] has a row's ones first (its length is their count), positions count from 0, "
            "and a prompt's next-token logits are at its last real token.",
            "",
            "```python",
            _generation_snippet(info),
            "```",
            "",
        ]
        return "\n".join(lines)
    lines += [
        "",
        "## Run it (ONNX Runtime, CUDA if it has it, else the CPU; inputs and outputs bound on the device)",
        "",
        "```python",
        _snippet(info),
        "```",
        "",
    ]
    return "\n".join(lines)


def _generation_snippet(info: dict) -> str:
    shared = info["generation"]["shared_cache"]
    return f"""import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

# One cache buffer per past input, [batch, kv_heads, MAX_SEQ, head_dim], bound as its present output too
# (GroupQueryAttention writes the new tokens in place; the mask as wide as the buffer), as ONNX Runtime
# GenAI runs such models: every decode step then has the same shapes and addresses, and replays as one
# CUDA graph. Without it, each step's presents are fed back as the next pasts.
SHARED_CACHE = {shared}
MAX_SEQ = {info["generation"]["max_seq_compiled_for"]}  # prompt + new tokens: what the artifact was compiled for
cuda = "CUDAExecutionProvider" in ort.get_available_providers()
graphs = {{"enable_cuda_graph": "1"}} if SHARED_CACHE else {{}}
sess = ort.InferenceSession("{info["model_file"]}",
                            providers=[("CUDAExecutionProvider", graphs)] if cuda else ["CPUExecutionProvider"])
device = "cuda" if cuda else "cpu"
pasts = [i for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
logits_out = sess.get_outputs()[0]
DTYPES = {{"tensor(float16)": np.float16, "tensor(float)": np.float32}}
# Greedy tokens are chosen on the device by a one-node model (ArgMax over the vocabulary), a decode step's
# written straight into the next step's input_ids: ids come back to the host, not the logits (at batch 8,
# 1 MB a step and 131 MB for a 128-token prompt, copied and scanned by numpy)
ELEM = {{"tensor(float16)": TensorProto.FLOAT16, "tensor(float)": TensorProto.FLOAT}}
ARGMAX = helper.make_graph(
    [helper.make_node("ArgMax", ["logits"], ["token"], axis=-1, keepdims=0)], "greedy",
    [helper.make_tensor_value_info("logits", ELEM[logits_out.type], ["batch", "seq", logits_out.shape[-1]])],
    [helper.make_tensor_value_info("token", TensorProto.INT64, ["batch", "seq"])])
ARGMAX = helper.make_model(ARGMAX, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()
greedy = ort.InferenceSession(ARGMAX, providers=["CUDAExecutionProvider" if cuda else "CPUExecutionProvider"])
EAGER = ort.RunOptions()
EAGER.add_run_config_entry("gpu_graph_id", "-1")  # a prompt's shapes vary: never captured


def on_device(x):
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(x), device, 0)


def zeros(shape, dtype=np.int64):
    return on_device(np.zeros(shape, dtype))


def choose(logits, token):
    # the greedy tokens after [batch, seq, vocab] logits, written into ``token`` [batch, seq] (on the device)
    binding = greedy.io_binding()
    binding.bind_ortvalue_input("logits", logits)
    binding.bind_ortvalue_output("token", token)
    return binding


def greedy_tokens(logits, batch, seq):
    tokens = zeros((batch, seq))
    greedy.run_with_iobinding(choose(logits, tokens))
    return tokens.numpy().copy()  # on the CPU a view of the OrtValue's buffer


def bind(feeds, cache, logits=None):
    binding = sess.io_binding()
    for name, value in feeds.items():
        binding.bind_ortvalue_input(name, value)
    binding.bind_ortvalue_output("logits", logits) if logits is not None else binding.bind_output("logits", device)
    for name, value in cache.items():
        binding.bind_ortvalue_input(name, value)
        present = name.replace("past_key_values.", "present.")
        binding.bind_ortvalue_output(present, value) if SHARED_CACHE else binding.bind_output(present, device)
    return binding


_decoders = {{}}  # batch -> its cache, decode step inputs, logits and binding: kept, so the graph replays them


def decoder(batch):
    if batch not in _decoders:
        cache = {{p.name: zeros((batch, p.shape[1], MAX_SEQ, p.shape[3]), DTYPES[p.type]) for p in pasts}}
        step = {{"input_ids": zeros((batch, 1)), "attention_mask": zeros((batch, MAX_SEQ)),
                "position_ids": zeros((batch, 1))}}
        logits = zeros((batch, 1, logits_out.shape[-1]), DTYPES[logits_out.type])
        replay = ort.RunOptions()
        replay.add_run_config_entry("gpu_graph_id", str(batch))  # one CUDA graph per batch size
        _decoders[batch] = cache, step, bind(step, cache, logits), replay, choose(logits, step["input_ids"])
    return _decoders[batch]


def generate(input_ids, attention_mask, max_new_tokens, eos_token_id=None):
    # greedy tokens after int64 prompts [batch, seq], padded on either side; returns prompts + new tokens.
    # The cache keeps each row's tokens at its front (GroupQueryAttention's layout): prompts go right-padded.
    batch, width = input_ids.shape
    if width + max_new_tokens > MAX_SEQ:
        raise ValueError(f"{{width}} prompt + {{max_new_tokens}} new tokens is past the {{MAX_SEQ}} compiled for")
    lengths = attention_mask.sum(-1)
    ids = np.take_along_axis(input_ids, np.argsort(attention_mask == 0, -1, kind="stable"), -1)
    if SHARED_CACHE:
        cache, step, decode, replay, pick = decoder(batch)
    else:
        cache = {{p.name: zeros((batch, p.shape[1], 0, p.shape[3]), DTYPES[p.type]) for p in pasts}}
    prompt = {{"input_ids": ids, "attention_mask": np.arange(width) < lengths[:, None],
              "position_ids": np.broadcast_to(np.arange(width), ids.shape)}}
    binding = bind({{k: on_device(v.astype(np.int64)) for k, v in prompt.items()}}, cache)
    sess.run_with_iobinding(binding, EAGER)
    # the prompt's next tokens: each row's at its last real token
    token = greedy_tokens(binding.get_outputs()[0], batch, width)[np.arange(batch), lengths - 1][:, None]
    new, done = [], np.zeros(batch, dtype=bool)
    for _ in range(max_new_tokens):
        new.append(token)
        done |= token[:, 0] == eos_token_id
        if done.all() or len(new) == max_new_tokens:
            break
        lengths = lengths + 1
        if SHARED_CACHE:  # the decode graph's inputs, rewritten in place (input_ids by the ArgMax)
            if len(new) == 1:
                step["input_ids"].update_inplace(token)
            step["attention_mask"].update_inplace((np.arange(MAX_SEQ) < lengths[:, None]).astype(np.int64))
            step["position_ids"].update_inplace((lengths - 1)[:, None].astype(np.int64))
            sess.run_with_iobinding(decode, replay)
            greedy.run_with_iobinding(pick)
            token = step["input_ids"].numpy().copy()  # on the CPU a view of the buffer the next ArgMax writes
        else:  # the presents in the order bound, after the logits
            cache = dict(zip(cache, binding.get_outputs()[1:]))
            feeds = {{"input_ids": token, "attention_mask": np.arange(width + len(new)) < lengths[:, None],
                     "position_ids": (lengths - 1)[:, None]}}
            binding = bind({{k: on_device(np.asarray(v, np.int64)) for k, v in feeds.items()}}, cache)
            sess.run_with_iobinding(binding, EAGER)
            token = greedy_tokens(binding.get_outputs()[0], batch, 1)
    return np.concatenate([input_ids, *new], 1)"""


def _snippet(info: dict) -> str:
    np_types = {
        "float": "np.float32",
        "float16": "np.float16",
        "int64": "np.int64",
        "int32": "np.int32",
        "bool": "np.bool_",
    }
    feeds = "\n".join(
        f'binding.bind_ortvalue_input("{v["name"]}", ort.OrtValue.ortvalue_from_numpy(\n'
        f"    np.ascontiguousarray({v['name']}, dtype={np_types.get(v['dtype'], 'np.float32')}), device, 0))"
        for v in info["inputs"]
    )
    outs = "\n".join(f'binding.bind_output("{v["name"]}", device)' for v in info["outputs"])
    return (
        "import numpy as np\nimport onnxruntime as ort\n\n"
        "# CUDA where this onnxruntime has it (onnxruntime-gpu), else the CPU\n"
        'device = "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"\n'
        "# fastest measured; enable_cuda_graph needs the same input shapes on every run of a session\n"
        f"options = {info['cuda_provider_options']}\n"
        'providers = [("CUDAExecutionProvider", options)] if device == "cuda" else ["CPUExecutionProvider"]\n'
        f'sess = ort.InferenceSession("{info["model_file"]}", providers=providers)\n'
        "binding = sess.io_binding()\n"
        f"# {', '.join(v['name'] for v in info['inputs'])}: numpy arrays shaped as in the table above\n"
        f"{feeds}\n{outs}\n"
        "sess.run_with_iobinding(binding)\n"
        f"[{', '.join(v['name'] for v in info['outputs'])}] = binding.copy_outputs_to_cpu()"
    )
