"""GPU check of the ONNX artifacts: BERT-base and ResNet-50 compiled on CUDA, exported, and run in
ONNX Runtime's CUDA provider with io_binding; error vs fp32; where ONNX Runtime placed each node
(from its verbose log), and which dtypes the nodes it put on the CPU produce.

    python benchmarks/onnx_cuda.py --out DIR        (needs a CUDA GPU and onnxruntime-gpu)

Writes DIR/onnx_cuda.json and DIR/<model>.ort_log.txt. Speed against the peers: benchmarks/gpu.py.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import time
from collections import Counter
from pathlib import Path

import onnx
import onnxruntime as ort
import torch

import mpcompiler
from benchmarks.gpu import Ort, bert_workloads, call, first, rel, resnet_workloads


def placement_log(model_path: Path, log_path: Path) -> str:
    """Create a verbose CUDA session with the process's stderr (where ONNX Runtime logs) in ``log_path``."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 0  # verbose: the node placements
    saved = os.dup(2)
    with open(log_path, "wb") as f:
        os.dup2(f.fileno(), 2)
        try:
            ort.InferenceSession(str(model_path), opts, providers=["CUDAExecutionProvider"])
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    return log_path.read_text(errors="replace")


def placements(log: str) -> list[str]:
    return [line.split("] ", 1)[-1].strip() for line in log.splitlines() if "placed on [" in line]


def cpu_nodes(log: str, model_path: Path) -> dict:
    """The nodes ONNX Runtime's log lists under the CPU provider, and the dtypes they produce."""
    names, inside = [], False
    for line in log.splitlines():
        text = line.split("VerifyEachNodeIsAssignedToAnEp]", 1)[-1]  # drop the log line's prefix
        node = re.match(r"\s+(\w+) \((.+)\)$", text)
        if "placed on [" in text:
            inside = "CPUExecutionProvider" in text
        elif inside and node:
            names.append(node.group(2))
    model = onnx.shape_inference.infer_shapes(onnx.load(str(model_path), load_external_data=False))
    types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.value_info, *model.graph.output)}
    by_name = {n.name: n for n in model.graph.node}
    dtypes = Counter(
        onnx.TensorProto.DataType.Name(types.get(o, 0)) for n in names if n in by_name for o in by_name[n].output
    )
    ops = Counter(by_name[n].op_type for n in names if n in by_name)
    return {"count": len(names), "ops": dict(ops), "output_dtypes": dict(dtypes)}


def check(make, out: Path) -> dict:
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 is fp32
    model, calib, workloads, _ = make()
    name, x = next(iter(workloads.items()))
    stem = name.split()[0]
    start = time.perf_counter()
    compiled = mpcompiler.compile(model, calib, val_data=[x], device="cuda")
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    art = compiled.export_onnx(out / f"{stem}.onnx", providers=["CUDAExecutionProvider"])
    export_s = time.perf_counter() - start
    log = placement_log(art.path, out / f"{stem}.ort_log.txt")
    feeds = {k: v.numpy() for k, v in x.items()} if isinstance(x, dict) else {"x": x.numpy()}
    session = Ort(str(art.path), feeds, cuda_graph=False, nhwc=False)
    session()
    with torch.no_grad():
        ref = first(call(model, {k: v.cuda() for k, v in x.items()} if isinstance(x, dict) else x.cuda()))
    return {
        "workload": name,
        "compile_s": round(compile_s, 1),
        "export_and_verify_s": round(export_s, 1),
        "verified_with": art.verified_with,
        "export_verification_error_vs_fp32": art.error_vs_fp32,
        "io_binding_error_vs_fp32": rel(session.output(), ref.float().cpu().numpy()),
        "ort_placements": placements(log),
        "cpu_nodes": cpu_nodes(log, art.path),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT") or tempfile.mkdtemp())
    out = Path(parser.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    info = {
        "device": torch.cuda.get_device_name(),
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "command": "python -m benchmarks.onnx_cuda --out $OUT",
        "results": [],
    }
    for make in (bert_workloads, resnet_workloads):
        result = check(make, out)
        info["results"].append(result)
        (out / "onnx_cuda.json").write_text(json.dumps(info, indent=1))
        print(json.dumps(result, indent=1), flush=True)


if __name__ == "__main__":
    main()
