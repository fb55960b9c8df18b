"""What both examples print and write: error vs fp32 on held-out samples, dtype counts, artifacts."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import mpcompiler
from mpcompiler.files import write_atomic


def parse_args(description: str, default_out: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out-dir", default=default_out, help="where results, dumps and the report go")
    parser.add_argument(
        "--dtype", default="float16", choices=["float16", "bfloat16", "auto"], help="auto: bf16 where fp16 overflows"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--tolerance", type=float, default=1e-3, help="rel. L2 error vs fp32 to meet on held-out samples (0: none)"
    )
    return parser.parse_args()


def compile_timed(model, calib, *, tolerance: float, **options) -> tuple[mpcompiler.CompiledModule, float]:
    start = time.perf_counter()
    compiled = mpcompiler.compile(model, calib, tolerance=tolerance or None, **options)
    return compiled, time.perf_counter() - start


def finish(name: str, compiled, metrics: dict, outputs, out_dir: Path, seconds: float, onnx_name: str) -> None:
    """Export ONNX; print the summary; write results.json, outputs.pt and graph_module.py beside the dumps."""
    report = compiled.report
    start = time.perf_counter()
    artifact = compiled.export_onnx(out_dir / onnx_name)
    onnx_seconds = time.perf_counter() - start
    metrics = {
        **metrics,
        "onnx_verified_with": artifact.verified_with,
        "onnx_rel_l2_error_vs_fp32": artifact.error_vs_fp32,
    }
    results = {
        "model": name,
        "dtype": report.dtype,
        "calibration_samples": report.calib_samples,
        "compile_seconds": round(seconds, 2),
        "onnx_export_seconds": round(onnx_seconds, 2),
        "ops_per_dtype": report.counts(),
        "compute_ops_per_dtype": report.counts("low"),
        "casts": report.casts(),
        "kept_high": [{"node": n.name, "module": n.module_path, "reason": n.reason} for n in report.kept_high()],
        "accuracy": report.accuracy.to_dict(),
        "search": report.search,
        "low_precision_flop_share": report.low_flop_share(),
        **metrics,
        "onnx": str(artifact.path),
        "torch": torch.__version__,
        "mpcompiler": mpcompiler.__version__,
    }
    write_atomic(out_dir / "results.json", json.dumps(results, indent=1) + "\n")
    torch.save(outputs, out_dir / "outputs.pt.tmp")
    (out_dir / "outputs.pt.tmp").replace(out_dir / "outputs.pt")
    write_atomic(out_dir / "graph_module.py", compiled.graph_module.code)
    print(f"== {name} ({report.dtype}), compiled in {seconds:.1f} s")
    for key, value in metrics.items():
        print(f"   {key}: {value}")
    print(f"   ops per dtype: {report.counts()}; compute-bound (matmul/conv/attention): {report.counts('low')}")
    print(f"   casts inserted: {report.casts()}; ops not in {report.dtype}: {len(report.kept_high())}")
    print(f"   {report.accuracy}")
    if report.search is not None:
        s = report.search
        print(
            f"   tolerance search: {len(s['evaluations'])} whole-model evaluations and {s['sensitivity_passes']} "
            f"sensitivity passes in {s['wall_s']:.1f} s; kept {s['kept_high']} of {s['candidates']} low ops high; "
            f"FLOPs in low precision: {report.low_flop_share():.1%}"
        )
        for d in report.culprits(3):
            where = d.module_path or "-"
            print(f"   culprit: %{d.name} ({d.op}) @ {where}: sensitivity {d.sensitivity:.2g}, {d.dtype}")
    print(f"   dumps and report.json: {out_dir / 'dumps'}; results: {out_dir / 'results.json'}")
    print(f"   ONNX: {artifact.path}, handoff {artifact.handoff} (exported and verified in {onnx_seconds:.1f} s)")
