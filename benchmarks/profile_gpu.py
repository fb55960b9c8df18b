"""Where the GPU time goes in mpcompiler's fastest FX mode (torch.compile reduce-overhead): per workload,
the share of GPU time in matmul/conv kernels, attention, and everything else, the GPU-busy time per
call against the call's wall time, and the achieved matmul rate.

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
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(ITERS):
            call(fn, x)
        torch.cuda.synchronize()
    kernels = defaultdict(float)
    by_kind = defaultdict(float)
    for e in prof.key_averages():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0:
            kernels[e.key] += e.self_device_time_total / ITERS / 1e3
            by_kind[kind_of(e.key)] += e.self_device_time_total / ITERS / 1e3
    busy = sum(by_kind.values())
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:8]
    return {
        "wall_ms_per_call": round(wall_ms, 3),
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
              "command": "python benchmarks/profile_gpu.py --out $OUT", "workloads": {}}  # fmt: skip
    for make, cnn in ((bert_workloads, False), (resnet_workloads, True)):
        model, calib, workloads, _ = make()
        compiled = mpcompiler.compile(model, calib, device="cuda")
        gm = compiled.graph_module.to(memory_format=torch.channels_last) if cnn else compiled.graph_module
        for name, x in workloads.items():
            x = (
                {k: v.cuda() for k, v in x.items()}
                if isinstance(x, dict)
                else x.cuda().to(memory_format=torch.channels_last)
            )
            fn = torch.compile(gm, mode="reduce-overhead", dynamic=False)
            with torch.no_grad():
                result["workloads"][name] = profile_one(fn, x)
            print(name, json.dumps(result["workloads"][name]), flush=True)
            (out / "profile_gpu.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
