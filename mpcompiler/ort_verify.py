"""Verify an ONNX artifact in ONNX Runtime: run it on the held-out samples in a child process (ort_child)
and compare its outputs with the fp32 model's and the FX module's; a causal LM's also decodes the FX
module's greedy tokens. Past the tolerance, an ExportError or a warning.

The artifact must be as accurate against fp32 as the FX module (within ``tolerance``), and differ from the
FX module by no more than ``tolerance`` plus the FX module's own error vs fp32: two computations of one
low-precision plan (ONNX Runtime's kernels, Inductor's) round differently, by about the plan's own error.
A bf16 plan's is ~6e-3 on the test Llama (run AH, H100: the artifact 6.1e-3 from fp32 and 6.6e-3 from the
FX module, whose own is 6.3e-3); e4m3's rounding steps (values an eighth apart) turn fp16 rounding
differences upstream of an activation's quantization into differences as large as the plan's error (the
test Llama's fp8 logits move 1.3e-2 when each weight scale moves by fp16's rounding, 2^-11;
docs/precision.md). A causal LM must also choose the FX module's greedy tokens.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.fx
import torch.fx._pytree as fx_pytree

from mpcompiler import ort_child
from mpcompiler.accuracy import flat_outputs, output_names, rel_l2
from mpcompiler.errors import ExportError
from mpcompiler.ir import META_KEY, graph_record
from mpcompiler.onnx_io import empty_pasts, onnx_input_name, with_io_dtype
from mpcompiler.samples import model_device, to_device

DEFAULT_TOLERANCE = 5e-3  # rel. L2 error vs fp32 (and vs the FX module) that verification accepts
GREEDY_STEPS = 8  # a causal LM's artifact decodes this many of the FX module's greedy tokens ...
GREEDY_AGREEMENT = 0.85  # ... and chooses each itself at least this often (a near tie may flip one)


def import_onnxruntime():
    """The onnxruntime module (the user installs it, or onnxruntime-gpu); if missing, an ExportError saying so."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise ExportError(
            "verifying the ONNX artifact needs ONNX Runtime: pip install onnxruntime-gpu (or onnxruntime "
            "on a CPU machine), or export with verify='off'"
        ) from exc
    return onnxruntime


def _providers(providers: list[str] | None) -> list[str]:
    """The providers asked for; default: CUDA if present, else CPU."""
    if providers is not None:
        return providers
    available = import_onnxruntime().get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def _cpu_only(providers: list[str]) -> bool:
    return all(p == "CPUExecutionProvider" for p in providers)


def check_bf16_nodes(gm: torch.fx.GraphModule, providers: list[str] | None) -> None:
    """A float16 plan with bf16 nodes (dtype="auto") cannot load in ONNX Runtime's CPU provider, which has
    no bf16 kernels: say so before exporting, naming the nodes."""
    ops = [n for n in gm.graph.nodes if n.op == "call_function" and n.meta.get(META_KEY) is not None]
    bf16 = [n.name for n in ops if n.meta[META_KEY].dtype == torch.bfloat16 and not n.meta[META_KEY].inserted]
    if graph_record(gm).dtype == torch.bfloat16 or not bf16 or not _cpu_only(_providers(providers)):
        return
    raise ExportError(
        f"the plan runs {len(bf16)} nodes in bf16 ({', '.join(bf16[:5])}{', ...' if len(bf16) > 5 else ''}) and "
        "ONNX Runtime's CPU provider has no bf16 kernels; verify with providers=['CUDAExecutionProvider'], pass "
        "verify='off', or compile with dtype='float16' (fp32 where fp16 overflows)"
    )


def verify_artifact(compiled, program, path, io, providers, tolerance, mode, padding, name=None):
    """Run the artifact in ONNX Runtime on the held-out samples, in a child process (ort_child.py);
    compare with fp32 and the FX module. A causal LM runs each held-out text as a prefill with an empty
    cache, and then decodes greedy tokens from the first, compared with the FX module's generate().
    ``name``: the artifact's path in messages (``path`` may be where it waits to be moved there)."""
    import_onnxruntime()  # a clear error if it is not installed
    gm = compiled.graph_module
    providers = _providers(providers)
    if graph_record(gm).dtype == torch.bfloat16 and _cpu_only(providers):
        warnings.warn(
            "ONNX Runtime's CPU provider has no bf16 kernels: the bf16 artifact is not verified", stacklevel=3
        )
        return None, {}, {}
    in_spec = gm.graph._codegen.pytree_info.in_spec
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]  # forward()'s names: ONNX's inputs
    device = model_device(gm)
    feeds, fx_outs = [], []
    with torch.no_grad():
        for sample in compiled.val_samples:
            args, kwargs = to_device(sample, device)
            flat = fx_pytree.tree_flatten_spec((args, kwargs), in_spec)
            if io is not None:
                flat = with_io_dtype(flat, io)
            flat = zip(names, flat, strict=True)
            feed = {n: v for n, v in flat if isinstance(v, torch.Tensor)}
            if compiled.lm is not None:
                feed |= empty_pasts(program, feed["input_ids"].shape[0])
            feed = {onnx_input_name(n): ort_child.feed_array(v) for n, v in feed.items()}
            feeds.append(_packed_rows(feed) if compiled.lm is not None else feed)
            fx_outs.append(flat_outputs(gm(*args, **kwargs)))
    steps = _greedy_steps(compiled)
    if steps:  # the FX module's greedy tokens from the first held-out text, which ONNX Runtime decodes too
        args, kwargs = to_device(compiled.val_samples[0], device)
        ids, mask, rows = kwargs["input_ids"], kwargs["attention_mask"], compiled.lm.max_batch
        # generate() takes max_batch rows at a time (the artifact's batch is dynamic); a stop cuts a chunk short
        chunks = [compiled.generate(ids[i : i + rows], mask[i : i + rows], max_new_tokens=steps)[:, ids.shape[1] :]
                  for i in range(0, len(ids), rows)]  # fmt: skip
        steps = min(c.shape[1] for c in chunks)
        fx_tokens = torch.cat([c[:, :steps] for c in chunks]).cpu()
        feeds[0][ort_child.FORCED] = fx_tokens.numpy()
    provider, outs = ort_child.run(path, feeds, providers)
    onnx_outs = [[torch.from_numpy(np.asarray(o)) for o in sample[: len(fx_outs[0])]] for sample in outs]
    fx_outs = [[t.cpu() if t is not None else None for t in o] for o in fx_outs]
    refs = compiled.val_refs
    if compiled.lm is not None:  # a causal LM's logits where there is a token: padding computes nothing used
        real = [torch.as_tensor(sample[1]["attention_mask"])[..., None].bool() for sample in compiled.val_samples]
        onnx_outs = [[_unpacked_rows(o[0], m[..., 0])] for o, m in zip(onnx_outs, real, strict=True)]
        onnx_outs, fx_outs, refs = (
            [[o[0] * m] for o, m in zip(x, real, strict=True)] for x in (onnx_outs, fx_outs, refs)
        )
    out_names = output_names(gm)
    vs_fp32 = rel_l2(onnx_outs, refs, out_names)
    vs_fx = rel_l2(onnx_outs, fx_outs, out_names)
    fx_vs_fp32 = rel_l2(fx_outs, refs, out_names)
    greedy = None
    if steps:  # each step's argmax in ONNX Runtime vs the token the FX module chose there
        greedy = float((torch.from_numpy(outs[0][-1]) == fx_tokens).float().mean())
    # each within the tolerance of the FX module's own error vs fp32 (the module's docstring says why)
    bounds = [(v, fx_vs_fp32.get(k, 0.0) + tolerance) for k, v in [*vs_fp32.items(), *vs_fx.items()]]
    if not all(v <= bound for v, bound in bounds) or (greedy is not None and greedy < GREEDY_AGREEMENT):
        msg = (
            f"the ONNX artifact {name or path} misses the tolerance {tolerance:g} in ONNX Runtime "
            f"({provider}): rel. L2 error vs fp32 {vs_fp32}, vs the FX module {vs_fx} (the FX module's own vs "
            f"fp32: {fx_vs_fp32})"
            + ("" if greedy is None else f"; greedy tokens as the FX module's: {greedy:.0%}")
            + (
                "; exported with padding='right', its attention reads each row's length only: a held-out "
                "sample padded otherwise (on the left, or a mask that is not padding) is computed differently "
                "(export with padding='any')"
                if padding == "right"
                else ""
            )
        )
        if mode == "error":
            raise ExportError(msg)
        warnings.warn(msg, stacklevel=3)
    if greedy is not None:
        vs_fx["greedy_agreement"] = greedy
    return provider, vs_fp32, vs_fx


def _packed_rows(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A left-padded causal-LM feed with each row's tokens moved to its front (the artifact's cache layout:
    prompts right-padded)."""
    shift = (feed["attention_mask"] == 0).sum(-1)
    rows = {"input_ids", "attention_mask", "position_ids"}
    return {k: np.stack([np.roll(r, -n) for r, n in zip(v, shift, strict=True)]) if k in rows else v
            for k, v in feed.items()}  # fmt: skip


def _unpacked_rows(out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Outputs [B, T, ...] of a right-padded feed back at their left-padded rows' positions."""
    shift = (mask == 0).sum(-1).tolist()
    return torch.stack([row.roll(n, 0) for row, n in zip(out, shift, strict=True)])


def _greedy_steps(compiled) -> int:
    """Greedy tokens verification decodes: 8, within the KV cache; 0 for a model not compiled to generate."""
    if compiled.lm is None:
        return 0
    first = compiled.val_samples[0][1]["input_ids"]
    return max(0, min(GREEDY_STEPS, compiled.lm.max_seq - first.shape[1]))
