"""Where the GPU time goes in mpcompiler's fastest FX mode (``compiled.cuda_graph()``): per workload,
the share of GPU time in matmul/conv kernels, attention, and everything else, the kernels per call,
and the GPU-busy time per call against the call's wall time (back to back, and one call at a time).

    python benchmarks/profile_gpu.py --out DIR      (needs a CUDA GPU)
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import mpcompiler
from benchmarks.gpu import bert_workloads, call, resnet_workloads

ITERS = 20


def kind_of(name: str) -> str:
    n = name.lower()
    if n.startswith("triton_"):  # Inductor's own kernels: elementwise and norms ("..._convolution_relu" too)
        return "other (elementwise, norm, copies)"
    if any(k in n for k in ("flash", "fmha", "attention", "sdpa")):
        return "attention"
    if any(
        k in n for k in ("gemm", "cutlass", "sm90", "xmma", "matmul", "nvjet", "conv", "implicit_convolve", "cudnn")
    ):
        return "matmul/conv"
    return "other (elementwise, norm, copies)"


def profile_one(fn, x) -> dict:
    for _ in range(5):
        call(fn, x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(ITERS):
        call(fn, x)
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) * 1e3 / ITERS
    latency = []
    for _ in range(ITERS):
        start = time.perf_counter()
        call(fn, x)
        torch.cuda.synchronize()
        latency.append((time.perf_counter() - start) * 1e3)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(ITERS):
            call(fn, x)
        torch.cuda.synchronize()
    kernels = defaultdict(float)
    by_kind = defaultdict(float)
    launches = 0
    for e in prof.key_averages():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0:
            kernels[e.key] += e.self_device_time_total / ITERS / 1e3
            by_kind[kind_of(e.key)] += e.self_device_time_total / ITERS / 1e3
            launches += e.count
    busy = sum(by_kind.values())
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:8]
    return {
        "wall_ms_per_call": round(wall_ms, 3),
        "latency_ms_median": round(sorted(latency)[len(latency) // 2], 3),
        "kernels_per_call": launches / ITERS,
        "gpu_busy_ms_per_call": round(busy, 3),
        "by_kind_ms": {k: round(v, 3) for k, v in by_kind.items()},
        "top_kernels_ms": [(k[:90], round(v, 3)) for k, v in top],
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT") or tempfile.mkdtemp())
    out = Path(parser.parse_args().out)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    result = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
              "command": "python -m benchmarks.profile_gpu --out $OUT", "workloads": {}}  # fmt: skip
    for make in (bert_workloads, resnet_workloads):
        model, calib, workloads, _ = make()
        compiled = mpcompiler.compile(model, calib, device="cuda")
        for name, x in workloads.items():
            x = {k: v.cuda() for k, v in x.items()} if isinstance(x, dict) else x.cuda()
            fn = compiled.cuda_graph(x)
            with torch.no_grad():
                result["workloads"][name] = profile_one(fn, x)
            print(name, json.dumps(result["workloads"][name]), flush=True)
            (out / "profile_gpu.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
