"""Where a TinyLlama-shaped generation spends its GPU time: one decode-graph replay per batch size and the
512-token prompt step, each as a kernel table (torch.profiler), with the HF prefill peers beside them.

    python -m benchmarks.profile_llm --out DIR [--rows 1,8] [--variants default,...] [--hf] [--dtype fp8]   (a GPU)

Compiles as benchmarks/llm.py does (max_seq 576, max_batch 8, cuDNN's SDPA off; in --dtype), then for each variant
(``default``: the compiled model's own generator; or a key of benchmarks.llm's EXPERIMENTS: a generator
whose steps are compiled under that context, its tokens compared with the default's) and batch size: the
replay's time (CUDA events, mean of 50 after 10 warm-ups), kernels per replay, and the kernels by time;
a whole generation's kernel time beside its wall time (a gap between them is the host's). Then the
prompt step's median time (benchmarks/gpu.py's timer), its kernels and its host ops (CPU time of their
own). With --hf, HF's eager and compiled prefill too. Writes DIR/profile_llm.txt and DIR/profile_llm.json
(after each measurement).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch
import transformers
from torch.profiler import ProfilerActivity, profile

import mpcompiler
from benchmarks.conv_fusion import ms as mean_ms
from benchmarks.gpu import median_ms_torch
from benchmarks.llm import EXPERIMENTS, SHAPES, hf_prefill
from mpcompiler.llm import Generator

MAX_SEQ, MAX_BATCH = 576, 8


def _averages(fn, calls: int, activity: ProfilerActivity):
    """torch.profiler's per-name averages of ``calls`` calls of ``fn`` (after one), on ``activity``'s side."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[activity]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return prof.key_averages()


def _line(us: float, count: float, key: str) -> str:
    return f"{us:9.1f} us  x{count:5.0f}  {key[:110]}"


def kernels(fn, calls: int, top: int) -> tuple[float, float, list[str]]:
    """(kernel ms per call, kernels per call, the top kernels by time) of ``fn``."""
    rows = [k for k in _averages(fn, calls, ProfilerActivity.CUDA) if k.self_device_time_total > 0]
    rows.sort(key=lambda k: -k.self_device_time_total)
    lines = [_line(k.self_device_time_total / calls, k.count / calls, k.key) for k in rows[:top]]
    total = sum(k.self_device_time_total for k in rows) / calls / 1e3
    return total, sum(k.count for k in rows) / calls, lines


def host_ops(fn, calls: int, top: int) -> list[str]:
    """The host's side of ``fn``: the ops and calls taking the most CPU time of their own (a step whose wall
    time passes its kernels' is bound here: the dynamic-shape prompt step, benchmarks/llm.py)."""
    rows = sorted(_averages(fn, calls, ProfilerActivity.CPU), key=lambda k: -k.self_cpu_time_total)
    return [_line(k.self_cpu_time_total / calls, k.count / calls, k.key) for k in rows[:top]]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--rows", default="1,8", help="decode graphs' batch sizes")
    parser.add_argument("--variants", default="default", help=f"comma-separated: default, {', '.join(EXPERIMENTS)}")
    parser.add_argument("--hf", action="store_true", help="HF's eager and compiled prefill too")
    parser.add_argument("--dtype", default="float16", help="compile's dtype (issue #13: fp8)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.enable_cudnn_sdp(False)  # as benchmarks/llm.py runs every row
    result, text = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d")}, []

    def report(label: str, fn, calls: int, top: int = 22):
        ms, count, lines = kernels(fn, calls, top)
        result[label] = result.get(label, {}) | {"kernel_ms": round(ms, 4), "kernels": round(count)}
        text.extend([f"== {label}: {ms:.4f} ms of kernels a call, {count:.0f} kernels", *lines])
        print("\n".join(text[-len(lines) - 1 :]), flush=True)
        (args.out / "profile_llm.json").write_text(json.dumps(result, indent=1))  # each step: a timeout keeps it
        (args.out / "profile_llm.txt").write_text("\n".join(text) + "\n")

    torch.manual_seed(0)
    fp32 = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPES)).eval().cuda()
    calib = [torch.randint(3, 32000, (2, 32 + 8 * i), device="cuda") for i in range(5)]
    compiled = mpcompiler.compile(fp32, calib, max_seq=MAX_SEQ, max_batch=MAX_BATCH, dtype=args.dtype)
    result["dtype"] = args.dtype
    with torch.no_grad():
        prompts = {int(r): torch.randint(3, 32000, (int(r), 128), device="cuda") for r in args.rows.split(",") if r}
        # the default's tokens, before any variant's context: its graphs compile as the default compiles them
        reference = {rows: compiled.generate(ids, max_new_tokens=128) for rows, ids in prompts.items()}
        for variant in args.variants.split(","):
            if variant == "default":
                generator, context, tag = compiled.generator, contextlib.nullcontext, ""
            else:
                generator, context = Generator(compiled.graph_module, compiled.lm), EXPERIMENTS[variant]
                tag = f"{variant}: "
            with context():  # the decode graphs and the prompt step compile on their first call, here
                for rows in prompts:
                    graph = generator.decode_graph(rows, greedy=True)  # the graph generate replays
                    label = f"{tag}decode {rows} rows"
                    result[label] = {"replay_ms": round(mean_ms(graph.graph.replay), 4)}
                    report(label, graph.graph.replay, calls=5)
                for rows, ids in prompts.items():  # a whole generation: kernels vs wall time
                    label = f"{tag}generate {rows} rows, 128 + 128 tokens"

                    def generate(ids=ids, generator=generator):
                        return generator.generate(ids, max_new_tokens=128)

                    tokens = generate()
                    if generator is not compiled.generator:
                        same = (tokens == reference[rows]).float().mean()
                        result[f"{label} token agreement"] = round(float(same), 4)
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    generate()
                    torch.cuda.synchronize()
                    result[label] = {"wall_ms": round((time.perf_counter() - t0) * 1e3, 2)}
                    report(label, generate, calls=1)
        long = torch.randint(3, 32000, (1, 512), device="cuda")
        ones = torch.ones(1, MAX_SEQ, dtype=torch.long, device="cuda")
        positions = torch.arange(512, device="cuda")

        def prompt():
            return compiled.generator(long, ones, positions[None], positions, causal=True)

        result["prompt step"] = {"median_ms": round(median_ms_torch(prompt), 4)}
        report("prompt step", prompt, calls=3)
        text.extend(["== prompt step, host: CPU time of its own a call", *host_ops(prompt, calls=3, top=20)])
        print("\n".join(text[-21:]), flush=True)
        (args.out / "profile_llm.txt").write_text("\n".join(text) + "\n")
        if args.hf:
            half = type(fp32)(fp32.config).eval().cuda()
            half.load_state_dict(fp32.state_dict())
            half = half.to(torch.float16)
            for label, flag in (("HF prefill eager", False), ("HF prefill compiled", True)):
                fn = hf_prefill(half, long, MAX_SEQ, flag)
                result[label] = {"median_ms": round(median_ms_torch(fn), 4)}
                report(label, fn, calls=3, top=12)


if __name__ == "__main__":
    main()
