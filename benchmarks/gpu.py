"""GPU benchmark: mpcompiler's artifacts against the peers users would pick, in one run.

    python benchmarks/gpu.py --models bert --out DIR      (and --models resnet; needs onnxruntime-gpu)
                             [--only 'substring,...']  (time only the rows whose label has one)

Workloads: BERT-base (HF, random init) batch 32 and 1 at seq 128; torchvision ResNet-50 batch 128 and 1.
Rows: fp32 eager; torch.autocast fp16; model.half() eager; torch.compile(model.half()) default and
reduce-overhead (channels_last for the CNN); ONNX Runtime CUDA with its float16 converter (and, for BERT,
its transformer optimizer on the legacy export of eager attention); mpcompiler's FX module eager, under
torch.compile(mode="reduce-overhead") and as compiled.cuda_graph(), and its ONNX artifact in ONNX Runtime
CUDA (BERT's also exported with padding="right", the right-padding contract of ORT's optimized model, and
its dtype="fp8" plan's, every linear an e4m3 GEMM, issue #13).
ONNX Runtime rows get CUDA graphs (and prefer_nhwc for the CNN), ours and the peers' alike. Timing:
median of 100 runs after 20 warm-ups, inputs and outputs on the GPU: CUDA events for PyTorch,
run_with_iobinding + synchronize_outputs for ONNX Runtime. Error: relative L2 vs fp32 eager (TF32 off)
on the same input.
Writes DIR/gpu_<model>.json and DIR/gpu_<model>.md, and DIR/gpu_<model>_kernels.json: the CUDA kernels
each ONNX model (ours, the optimizer peer's) runs per call, from torch.profiler's CUPTI trace of the
ONNX Runtime session (which sees every kernel the process launches, ONNX Runtime's included).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import onnxruntime as ort
import torch
import torch._inductor.config
import torchvision
import transformers
from onnxruntime.transformers import optimizer as ort_optimizer
from onnxruntime.transformers.float16 import convert_float_to_float16
from torch.export import Dim

import mpcompiler
from mpcompiler import fp8

WARMUP, RUNS = 20, 100


def first(out):
    if isinstance(out, torch.Tensor):
        return out
    return out[0] if isinstance(out, (tuple, list)) else next(iter(out.values()))


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def median_ms_torch(fn) -> float:
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


class Ort:
    """An ONNX Runtime CUDA session, I/O bound on the GPU."""

    def __init__(self, model, feeds: dict, *, cuda_graph: bool, nhwc: bool):
        options = {"enable_cuda_graph": "1" if cuda_graph else "0", "prefer_nhwc": "1" if nhwc else "0"}
        self.sess = ort.InferenceSession(model, providers=[("CUDAExecutionProvider", options)])
        self.binding = self.sess.io_binding()
        names = {i.name for i in self.sess.get_inputs()}
        self.keep = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v), "cuda", 0) for v in feeds.values()]
        for name, value in zip(feeds, self.keep, strict=True):
            if name in names:
                self.binding.bind_ortvalue_input(name, value)
        for o in self.sess.get_outputs():
            self.binding.bind_output(o.name, "cuda")

    def __call__(self):
        self.sess.run_with_iobinding(self.binding)
        self.binding.synchronize_outputs()

    def output(self):
        return self.binding.copy_outputs_to_cpu()[0]

    def median_ms(self) -> float:
        for _ in range(WARMUP):
            self()
        times = []
        for _ in range(RUNS):
            start = time.perf_counter()
            self()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)


def cuda_kernels(fn, calls: int, top: int = 30) -> dict:
    """The CUDA kernels one call of ``fn`` launches, whoever launches them (ONNX Runtime, a CUDA graph's
    replay): count and device time per call, by kernel name, from a CUPTI trace (torch.profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels.sort(key=lambda e: -e.device_time_total)
    return {
        "kernels_per_call": round(sum(e.count for e in kernels) / calls, 1),
        "device_us_per_call": round(sum(e.device_time_total for e in kernels) / calls, 1),
        "top": [{"kernel": e.key[:120], "per_call": round(e.count / calls, 2), "us_per_call": round(
            e.device_time_total / calls, 1)} for e in kernels[:top]],
    }  # fmt: skip


def ort_kernels(model, feeds: dict, runs: int = 20) -> dict:
    """:func:`cuda_kernels` of an ONNX Runtime CUDA session's call (no CUDA graph), after 5 warm-ups."""
    session = Ort(model, feeds, cuda_graph=False, nhwc=False)
    for _ in range(5):
        session()
    return cuda_kernels(session, runs)


class Bench:
    def __init__(self, name: str, out: Path, only: tuple[str, ...] = ()):
        self.name, self.out, self.rows, self.only = name, out, [], only

    def wants(self, label: str) -> bool:
        """Whether a row of this label runs: it has one of ``only``'s substrings, when given."""
        return not self.only or any(s in label for s in self.only)

    def row(self, workload, label, build, run, output, batch):
        """Time ``run`` (after ``build``), compare ``output()`` with the fp32 reference; skipped unless
        :meth:`wants` it."""
        if not self.wants(label):
            return
        try:
            start = time.perf_counter()
            state = build()
            build_s = time.perf_counter() - start
            ms = run(state)
            err = rel(output(state), self.ref[workload])
            self.rows.append({"workload": workload, "row": label, "median_ms": round(ms, 3),
                              "throughput_per_s": round(batch * 1e3 / ms, 1), "rel_l2_vs_fp32": err,
                              "build_s": round(build_s, 1)})  # fmt: skip
        except Exception as exc:  # one failing row must not lose the others
            self.rows.append({"workload": workload, "row": label, "error": f"{type(exc).__name__}: {exc}"[:300]})
        print(json.dumps(self.rows[-1]), flush=True)
        (self.out / f"gpu_{self.name}.json").write_text(json.dumps(self.meta | {"rows": self.rows}, indent=1))


def bert_workloads():
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig()).eval().cuda()

    def sample(b):
        mask = torch.ones(b, 128, dtype=torch.long)
        mask[: max(1, b // 4), 96:] = 0  # a quarter of the rows padded
        return {"input_ids": torch.randint(1000, 30000, (b, 128)), "attention_mask": mask}

    calib = [sample(32) for _ in range(8)]
    ds = {"input_ids": {0: Dim.AUTO, 1: Dim.AUTO}, "attention_mask": {0: Dim.AUTO, 1: Dim.AUTO}}
    return model, calib, {"bert-base b32 s128": sample(32), "bert-base b1 s128": sample(1)}, ds


def resnet_workloads():
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval().cuda()
    calib = [torch.randn(32, 3, 224, 224) for _ in range(8)]
    return (
        model,
        calib,
        {"resnet50 b128": torch.randn(128, 3, 224, 224), "resnet50 b1": torch.randn(1, 3, 224, 224)},
        ({0: Dim.AUTO},),
    )


def _timed(bench, what: str, build):
    """(result, seconds) of a peer's build; (None, 0) and the error in the metadata if it fails."""
    start = time.perf_counter()
    try:
        return build(), round(time.perf_counter() - start, 1)
    except Exception as exc:
        bench.meta[f"{what}_error"] = f"{type(exc).__name__}: {exc}"[:500]
        print(what, "failed:", bench.meta[f"{what}_error"], flush=True)
        return None, 0.0


def _converted(model, args, kwargs, dynamic_shapes) -> bytes:
    """The peer: torch.onnx's fp32 export through ONNX Runtime's float16 converter."""
    fp32 = torch.onnx.export(model, args, kwargs=kwargs, dynamic_shapes=dynamic_shapes, dynamo=True).model_proto
    return convert_float_to_float16(fp32, keep_io_types=True).SerializeToString()


class _Plain(torch.nn.Module):
    """BERT with a plain forward: the TorchScript exporter trips on transformers 5's decorated one."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask, token_type_ids):
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return out.last_hidden_state, out.pooler_output


_BERT_DIMS = ("input_ids", "attention_mask", "token_type_ids")  # ORT's BERT recipe exports these three inputs


def _optimized(model, example, tmp: Path) -> str:
    """The peer ONNX Runtime documents for BERT: legacy export with BERT's three inputs, transformer
    optimizer, fp16. The model runs eager attention for it: the optimizer's fusion patterns know that graph,
    not SDPA's. Batch and sequence dims are exported dynamic, as ONNX Runtime's recipe does (a CUDA graph
    still captures each fixed-shape run): exported with static shapes, as this peer was until 2026-12-06,
    the optimizer fused no EmbedLayerNormalization (checked on the CPU), so the padding mask never became
    the 1-D mask index that ORT's fused attention kernels read, and the peer ran 2x slower than ONNX
    Runtime's own recipe (issue #12)."""
    tmp.mkdir(parents=True, exist_ok=True)
    legacy = str(tmp / "bert_legacy_fp32.onnx")
    eager = copy.deepcopy(model).cpu()
    eager.set_attn_implementation("eager")
    torch.onnx.export(
        _Plain(eager), (example["input_ids"], example["attention_mask"], torch.zeros_like(example["input_ids"])),
        legacy, dynamo=False, opset_version=17, input_names=list(_BERT_DIMS),
        dynamic_axes={name: {0: "batch", 1: "sequence"} for name in _BERT_DIMS},
        output_names=["last_hidden_state", "pooler_output"],
    )  # fmt: skip
    cfg = model.config
    opt = ort_optimizer.optimize_model(
        legacy, model_type="bert", num_heads=cfg.num_attention_heads, hidden_size=cfg.hidden_size, use_gpu=True
    )
    opt.convert_float_to_float16(keep_io_types=True)
    path = str(tmp / "bert_legacy_opt_fp16.onnx")
    opt.save_model_to_file(path)
    print(json.dumps({"optimizer fused ops": opt.get_fused_operator_statistics()}), flush=True)  # issue #12
    return path


def call(fn, x):
    return fn(**x) if isinstance(x, dict) else fn(x)


def autocast(model, *args, **kwargs):
    with torch.autocast("cuda", dtype=torch.float16):
        return model(*args, **kwargs)


def compiled_fn(module, mode: str, x):
    """torch.compile, with the compilation (and CUDA-graph capture) done here, outside the timing."""
    fn = torch.compile(module, mode=mode, dynamic=False)
    for _ in range(3):
        call(fn, x)
    return fn


def torch_row(bench, workload, label, fn, x, batch, build=None):
    bench.row(workload, label, build or (lambda: fn), lambda f: median_ms_torch(lambda: call(f, x)),
              lambda f: first(call(f, x)).float().cpu().numpy(), batch)  # fmt: skip


def ort_row(bench, workload, label, model, feeds, batch, cuda_graph: bool, nhwc: bool):
    bench.row(workload, label, lambda: Ort(model, feeds, cuda_graph=cuda_graph, nhwc=nhwc),
              lambda s: s.median_ms(), lambda s: s.output(), batch)  # fmt: skip


def run_model(kind: str, out: Path, only: tuple[str, ...] = ()):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    model, calib, workloads, ds = bert_workloads() if kind == "bert" else resnet_workloads()
    cnn = kind == "resnet"
    bench = Bench(kind, out, only)
    bench.meta = {
        "device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
        "onnxruntime": ort.__version__, "transformers": transformers.__version__, "mpcompiler": mpcompiler.__version__,
        "command": f"python benchmarks/gpu.py --models {kind} --out $OUT", "warmup": WARMUP, "runs": RUNS,
    }  # fmt: skip
    bench.meta["command"] += f" --only '{','.join(only)}'" if only else ""
    cuda = lambda x: {k: v.cuda() for k, v in x.items()} if isinstance(x, dict) else x.cuda()  # noqa: E731
    cl = lambda x: x.to(memory_format=torch.channels_last) if cnn else x  # noqa: E731
    bench.ref = {}
    with torch.no_grad():
        for w, x in workloads.items():
            bench.ref[w] = first(call(model, cuda(x))).float().cpu().numpy()

    start = time.perf_counter()
    compiled = mpcompiler.compile(model, calib, val_data=[workloads[next(iter(workloads))]], device="cuda")
    compile_s = time.perf_counter() - start
    tmp = Path(tempfile.mkdtemp())
    start = time.perf_counter()
    artifact = compiled.export_onnx(tmp / f"{kind}.onnx", providers=["CUDAExecutionProvider"])
    export_s = time.perf_counter() - start
    # BERT's samples are right-padded, the contract of ORT's own optimized model: the artifact for it too
    artifacts = {"mpcompiler ONNX": str(artifact.path)}
    if not cnn:
        right = compiled.export_onnx(tmp / f"{kind}_right.onnx", providers=["CUDAExecutionProvider"], padding="right")
        artifacts["mpcompiler ONNX padding='right'"] = str(right.path)
    bench.meta["mpcompiler_report"] = str(compiled.report)
    fp8_plans = {}

    def fp8_plan(tolerance, fast_accum=fp8.FAST_ACCUM):  # compiled on first use: a run without its rows pays nothing
        if (tolerance, fast_accum) not in fp8_plans:
            val = [workloads[next(iter(workloads))]]
            with mock.patch.object(fp8, "FAST_ACCUM", fast_accum):  # read by lower_fp8 and the search's runs
                plan = mpcompiler.compile(model, calib, val_data=val, device="cuda", dtype="fp8", tolerance=tolerance)
            fp8_plans[tolerance, fast_accum] = plan
            key = f"{f'_tolerance_{tolerance:g}' if tolerance else ''}{'' if fast_accum else '_no_fast_accumulation'}"
            bench.meta[f"mpcompiler_fp8_report{key}"] = str(plan.report)
        return fp8_plans[tolerance, fast_accum]

    # issue #13: the e4m3 plan's artifact (each GEMM's input scaled and cast to e4m3, DequantizeLinear of both
    # operands, an fp16 MatMul): whether ONNX Runtime's CUDA provider runs an fp8 GEMM there, and how fast (its
    # kernel list below says which GEMM ran)
    if not cnn and bench.wants("mpcompiler ONNX fp8, ORT CUDA"):
        fp8_artifact = fp8_plan(None).export_onnx(tmp / f"{kind}_fp8.onnx", providers=["CUDAExecutionProvider"])
        artifacts["mpcompiler ONNX fp8"] = str(fp8_artifact.path)
    fp8_rows = {  # issue #13: e4m3 GEMMs, all / where 1e-2 allows; and without cuBLASLt's fast accumulation
        "mpcompiler FX fp8, compiled.cuda_graph()": (None, fp8.FAST_ACCUM),
        "mpcompiler FX fp8 tolerance=0.01, compiled.cuda_graph()": (1e-2, fp8.FAST_ACCUM),
        "mpcompiler FX fp8, no fast accumulation (experiment), compiled.cuda_graph()": (None, False),
        "mpcompiler FX fp8 tolerance=0.01, no fast accumulation (experiment), compiled.cuda_graph()": (1e-2, False),
    }
    half = copy.deepcopy(model).half()
    half_cl = copy.deepcopy(half).to(memory_format=torch.channels_last) if cnn else half
    gm_fast = compiled.graph_module
    if cnn:
        gm_fast = copy.deepcopy(gm_fast).to(memory_format=torch.channels_last)

    # peers' ONNX: the fp32 export through ORT's float16 converter; for BERT also the transformer optimizer
    example = next(iter(workloads.values()))
    args, kwargs = ((), cuda(example)) if not cnn else ((cuda(example),), {})
    converted, converter_s = _timed(bench, "converter", lambda: _converted(model, args, kwargs, ds))
    optimized, optimizer_s = (None, 0.0) if cnn else _timed(bench, "optimizer", lambda: _optimized(model, example, tmp))

    for w, x in workloads.items():
        batch = (x["input_ids"] if isinstance(x, dict) else x).shape[0]
        xg = cuda(x)
        xh = xg.half() if cnn else xg
        feeds = {k: v.numpy() for k, v in x.items()} if isinstance(x, dict) else {"x": x.numpy()}
        if not cnn:  # the optimizer peer's third input (a session binds only the inputs it has)
            feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
        with torch.no_grad():
            torch_row(bench, w, "fp32 eager", model, xg, batch)
            torch_row(bench, w, "torch.autocast fp16", functools.partial(autocast, model), xg, batch)
            torch_row(bench, w, "model.half() eager", half, xh, batch)
            for mode in ("default", "reduce-overhead"):
                label = f"torch.compile(model.half(), {mode})" + (", channels_last" if cnn else "")
                torch_row(
                    bench, w, label, None, cl(xh), batch, build=functools.partial(compiled_fn, half_cl, mode, cl(xh))
                )
            for graph in (False, True):
                for nhwc in (False, True) if cnn else (False,):
                    tag = " ".join(t for t in ("CUDA graph" if graph else "", "NHWC" if nhwc else "") if t)
                    ort_row(
                        bench, w, f"ORT CUDA, ORT float16 converter {tag}".strip(), converted, feeds, batch, graph, nhwc
                    )
                    if optimized:
                        label = f"ORT CUDA, transformer optimizer + fp16 {tag}".strip()
                        ort_row(bench, w, label, optimized, feeds, batch, graph, nhwc)
            torch_row(bench, w, "mpcompiler FX, eager", compiled, xg, batch)
            label = "mpcompiler FX, torch.compile reduce-overhead" + (", channels_last" if cnn else "")
            torch_row(
                bench,
                w,
                label,
                None,
                cl(xg),
                batch,
                build=functools.partial(compiled_fn, gm_fast, "reduce-overhead", cl(xg)),
            )
            for autotune in (False, True):
                torch_row(
                    bench, w, f"mpcompiler FX, compiled.cuda_graph({'autotune=True' if autotune else ''})", None,
                    xg, batch,  # a copy: it turns CNN weights NHWC
                    build=lambda xg=xg, a=autotune: copy.deepcopy(compiled).cuda_graph(xg, autotune=a),
                )  # fmt: skip
            for label, (tolerance, fast) in fp8_rows.items() if not cnn else ():
                torch_row(bench, w, label, None, xg, batch,
                          build=lambda xg=xg, t=tolerance, f=fast: fp8_plan(t, f).cuda_graph(xg))  # fmt: skip
            for name, onnx_path in artifacts.items():
                for graph in (False, True):
                    tag = " ".join(t for t in ("CUDA graph" if graph else "", "NHWC" if cnn else "") if t)
                    ort_row(bench, w, f"{name}, ORT CUDA {tag}".strip(), onnx_path, feeds, batch, graph, cnn)
    kernels = {}
    for w, x in workloads.items():  # which kernels each ONNX model and the FX replay run (issue #12: prove it)
        feeds = {k: v.numpy() for k, v in x.items()} if isinstance(x, dict) else {"x": x.numpy()}
        if not cnn:
            feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
        for label, onnx_model in [*artifacts.items(), ("ORT optimizer peer", optimized)]:
            row = "ORT CUDA, transformer optimizer + fp16" if onnx_model is optimized else f"{label}, ORT CUDA"
            if onnx_model is None or not bench.wants(f"{row} CUDA graph"):  # profiled where its row is timed
                continue
            try:
                k = kernels[f"{w} | {label}"] = ort_kernels(onnx_model, feeds)
                summary = {"per_call": k["kernels_per_call"], "device_us": k["device_us_per_call"]}
            except Exception as exc:  # the profile is evidence, not a row: its failure loses no timing
                summary = kernels[f"{w} | {label}"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            print(json.dumps({"kernels": f"{w} | {label}"} | summary), flush=True)
        plans = {"mpcompiler FX, compiled.cuda_graph()": lambda: compiled}
        for label, (tolerance, fast) in fp8_rows.items() if not cnn else ():  # e4m3 GEMMs against fp16 ones
            if tolerance:
                plans[label] = lambda t=tolerance, f=fast: fp8_plan(t, f)
        for label, plan in plans.items():  # the FX replays beside ONNX Runtime's (BERT b1: 0.51 against 0.43 ms)
            if not bench.wants(label):
                continue
            try:
                xg = cuda(x)
                graph = copy.deepcopy(plan()).cuda_graph(xg)
                for _ in range(5):
                    call(graph, xg)
                k = kernels[f"{w} | {label}"] = cuda_kernels(lambda graph=graph, xg=xg: call(graph, xg), 20)
                summary = {"per_call": k["kernels_per_call"], "device_us": k["device_us_per_call"]}
            except Exception as exc:
                summary = kernels[f"{w} | {label}"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            print(json.dumps({"kernels": f"{w} | {label}"} | summary), flush=True)
    (out / f"gpu_{kind}_kernels.json").write_text(json.dumps(kernels, indent=1))
    bench.meta |= {"mpcompiler_compile_s": round(compile_s, 1), "mpcompiler_export_s": round(export_s, 1),
                   "converter_build_s": round(converter_s, 1), "optimizer_build_s": round(optimizer_s, 1)}  # fmt: skip
    (out / f"gpu_{kind}.json").write_text(json.dumps(bench.meta | {"rows": bench.rows}, indent=1))
    (out / f"gpu_{kind}.md").write_text(table(bench.meta, bench.rows))
    print(table(bench.meta, bench.rows))


def table(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"{meta['date']}, {meta['device']}, torch {meta['torch']}, onnxruntime-gpu {meta['onnxruntime']}, "
        f"transformers {meta['transformers']}. Command: `{meta['command']}`. Median of {meta['runs']} runs after "
        f"{meta['warmup']} warm-ups. Build: mpcompiler compile {meta.get('mpcompiler_compile_s')} s + ONNX export "
        f"{meta.get('mpcompiler_export_s')} s; ORT float16 converter {meta.get('converter_build_s')} s; transformer "
        f"optimizer {meta.get('optimizer_build_s')} s.",
        "",
        "| workload | row | median ms | per s | rel. L2 vs fp32 | build s |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['workload']} | {r['row']} | failed: {r['error'][:80]} | | | |")
        else:
            lines.append(f"| {r['workload']} | {r['row']} | {r['median_ms']:.3f} | {r['throughput_per_s']:.0f} | "
                         f"{r['rel_l2_vs_fp32']:.2e} | {r['build_s']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="bert,resnet")
    parser.add_argument("--out", default=os.environ.get("OUT") or tempfile.mkdtemp())
    parser.add_argument("--only", default="", help="comma-separated substrings: time only the rows they name")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for kind in args.models.split(","):
        with contextlib.suppress(KeyboardInterrupt):
            run_model(kind, out, tuple(filter(None, args.only.split(","))))


if __name__ == "__main__":
    main()
