"""The tolerance search on real-size models: BERT-base (HF, random init) and ResNet-50, tolerance 1e-3.

    python -m benchmarks.tolerance --out DIR [--device cuda]

Per model: the search's candidates, ops kept high, whole-model evaluations, sensitivity passes, its
wall time, the held-out error, and the share of FLOPs left in low precision. Writes DIR/tolerance.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

import mpcompiler
from benchmarks.gpu import bert_workloads, resnet_workloads


def run(kind: str, device: str, tolerance: float) -> dict:
    model, calib, workloads, _ = bert_workloads() if kind == "bert" else resnet_workloads()
    val = [next(iter(workloads.values()))]
    start = time.perf_counter()
    compiled = mpcompiler.compile(model, calib[:4], val_data=val, device=device, tolerance=tolerance)
    report = compiled.report
    return {
        "model": "bert-base" if kind == "bert" else "resnet50",
        "compile_s": round(time.perf_counter() - start, 1),
        "search": report.search,
        "accuracy": report.accuracy.to_dict(),
        "low_flop_share": report.low_flop_share(),
        "culprits": [f"%{d.name} ({d.op}) @ {d.module_path}: {d.sensitivity:.2g}" for d in report.culprits(5)],
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT") or tempfile.mkdtemp())
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tolerance", type=float, default=1e-3)
    args = parser.parse_args()
    meta = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "command": f"python -m benchmarks.tolerance --device {args.device} --out $OUT",
    }
    rows = []
    for kind in ("bert", "resnet"):
        rows.append(run(kind, args.device, args.tolerance))
        print(json.dumps(rows[-1], indent=1), flush=True)
        Path(args.out, "tolerance.json").write_text(json.dumps(meta | {"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
