"""GPU check of the ONNX artifacts: BERT-base and ResNet-50 compiled on CUDA, exported, and run in
ONNX Runtime's CUDA provider with io_binding; error vs fp32; where ONNX Runtime placed each node;
and a first look at speed (median of 50 timed runs after 10 warm-ups; not issue #5's benchmark).

    python benchmarks/onnx_cuda.py --out DIR        (needs a CUDA GPU and onnxruntime-gpu)

Writes DIR/onnx_cuda.json, DIR/<model>.ort_log.txt and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torchvision
import transformers
from onnxruntime.transformers.float16 import convert_float_to_float16
from torch.export import Dim

import mpcompiler

WARMUP, RUNS = 10, 50


def bert_base():
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig()).eval()  # bert-base: 12 layers, hidden 768

    def sample(b, s):
        mask = torch.ones(b, s, dtype=torch.long)
        mask[: b // 4, s // 2 :] = 0  # a quarter of the rows padded
        return {"input_ids": torch.randint(1000, 30000, (b, s)), "attention_mask": mask}

    calib = [sample(32, 128) for _ in range(4)]
    ds = {"input_ids": {0: Dim.AUTO, 1: Dim.AUTO}, "attention_mask": {0: Dim.AUTO, 1: Dim.AUTO}}
    return "bert-base b32 s128", model, calib, sample(32, 128), ds


def resnet50():
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    calib = [torch.randn(32, 3, 224, 224) for _ in range(4)]
    return "resnet50 b128", model, calib, torch.randn(128, 3, 224, 224), ({0: Dim.AUTO},)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def time_torch(fn) -> float:
    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(RUNS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


class OrtRunner:
    """An ONNX Runtime CUDA session with inputs and outputs bound on the GPU."""

    def __init__(self, model, feeds: dict[str, torch.Tensor], log_path: Path | None = None):
        opts = ort.SessionOptions()
        if log_path is not None:
            opts.log_severity_level = 0  # verbose: the node placements
        self.sess = _capture_stderr(
            lambda: ort.InferenceSession(model, opts, providers=["CUDAExecutionProvider"]), log_path
        )
        self.binding = self.sess.io_binding()
        names = {i.name for i in self.sess.get_inputs()}
        self.inputs = {
            k: ort.OrtValue.ortvalue_from_numpy(v.cpu().numpy(), "cuda", 0) for k, v in feeds.items() if k in names
        }
        for k, v in self.inputs.items():
            self.binding.bind_ortvalue_input(k, v)
        for o in self.sess.get_outputs():
            self.binding.bind_output(o.name, "cuda")

    def __call__(self):
        self.sess.run_with_iobinding(self.binding)
        self.binding.synchronize_outputs()

    def outputs(self):
        return self.binding.copy_outputs_to_cpu()

    def time(self) -> float:
        for _ in range(WARMUP):
            self()
        times = []
        for _ in range(RUNS):
            start = time.perf_counter()
            self()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)


def _capture_stderr(fn, path: Path | None):
    """Run fn with the process's stderr (where ONNX Runtime logs) going to ``path``."""
    if path is None:
        return fn()
    saved = os.dup(2)
    with open(path, "wb") as f:
        os.dup2(f.fileno(), 2)
        try:
            return fn()
        finally:
            os.dup2(saved, 2)
            os.close(saved)


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


def check(name, model, calib, val, dynamic_shapes, out: Path) -> dict:
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 is fp32
    model = model.cuda()
    feeds = val if isinstance(val, dict) else {"x": val}
    feeds = {k: v.cuda() for k, v in feeds.items()}
    args, kwargs = ((), feeds) if isinstance(val, dict) else ((feeds["x"],), {})
    start = time.perf_counter()
    compiled = mpcompiler.compile(model, calib, val_data=[val], device="cuda")
    compile_s = time.perf_counter() - start
    stem = name.split()[0]
    start = time.perf_counter()
    art = compiled.export_onnx(out / f"{stem}.onnx", providers=["CUDAExecutionProvider"])
    export_s = time.perf_counter() - start

    log_path = out / f"{stem}.ort_log.txt"
    ours = OrtRunner(str(art.path), feeds if isinstance(val, dict) else {"x": feeds["x"]}, log_path)
    ours()
    with torch.no_grad():
        ref = model(*args, **kwargs)
        ref = ref.last_hidden_state if hasattr(ref, "last_hidden_state") else ref
        fx = compiled(*args, **kwargs)
        fx = fx.last_hidden_state if hasattr(fx, "last_hidden_state") else fx
    err_onnx = rel(ours.outputs()[0], ref.cpu())
    err_fx = rel(fx.float().cpu(), ref.cpu())

    fp32_onnx = torch.onnx.export(model, args, kwargs=kwargs, dynamic_shapes=dynamic_shapes, dynamo=True).model_proto
    peer_model = convert_float_to_float16(fp32_onnx, keep_io_types=True)
    peer = OrtRunner(peer_model.SerializeToString(), feeds)
    peer()
    err_peer = rel(peer.outputs()[0], ref.cpu())

    half = copy.deepcopy(model).half()
    half_args = tuple(a.half() for a in args)
    with torch.no_grad():
        h = half(*half_args, **kwargs)
        h = h.last_hidden_state if hasattr(h, "last_hidden_state") else h
    err_half = rel(h.float().cpu(), ref.cpu())
    with torch.no_grad():
        rows = {
            "fp32 eager": (time_torch(lambda: model(*args, **kwargs)), 0.0),
            "model.half() eager": (time_torch(lambda: half(*half_args, **kwargs)), err_half),
            "mpcompiler FX eager": (time_torch(lambda: compiled(*args, **kwargs)), err_fx),
            "ORT CUDA, ORT float16 converter": (peer.time(), err_peer),
            "mpcompiler ONNX, ORT CUDA": (ours.time(), err_onnx),
        }
    log = log_path.read_text(errors="replace")
    return {
        "workload": name,
        "compile_s": round(compile_s, 1),
        "export_and_verify_s": round(export_s, 1),
        "verified_with": art.verified_with,
        "export_verification_error_vs_fp32": art.error_vs_fp32,
        "io_binding_error_vs_fp32": err_onnx,
        "ort_placements": placements(log),
        "cpu_nodes": cpu_nodes(log, art.path),
        "rows": {k: {"median_ms": round(v[0], 3), "rel_l2_vs_fp32": v[1]} for k, v in rows.items()},
        "report": str(compiled.report),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT") or tempfile.mkdtemp())
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = {
        "device": torch.cuda.get_device_name(),
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "python": platform.python_version(),
        "command": "python benchmarks/onnx_cuda.py --out $OUT",
        "results": [],
    }
    for make in (bert_base, resnet50):
        result = check(*make(), out)
        info["results"].append(result)
        (out / "onnx_cuda.json").write_text(json.dumps(info, indent=1))
        r = result
        print(f"\n== {r['workload']}: compile {r['compile_s']} s, export+verify {r['export_and_verify_s']} s")
        print(f"   verified with {r['verified_with']}: {r['export_verification_error_vs_fp32']}")
        print(f"   io_binding rel. L2 vs fp32 {r['io_binding_error_vs_fp32']:.2e}; placements: {r['ort_placements']}")
        print(f"   on the CPU provider: {r['cpu_nodes']}")
        for k, v in result["rows"].items():
            print(f"   {k:<34} {v['median_ms']:>9.3f} ms   rel. L2 vs fp32 {v['rel_l2_vs_fp32']:.2e}")


if __name__ == "__main__":
    main()
