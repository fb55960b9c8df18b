"""e4m3 GEMMs: the one place their arithmetic is written (``compile(dtype="fp8")``, issue #13).

A linear planned in fp8 reads its input and its weight in float8_e4m3fn with static per-tensor scales, both
from calibration: ``x_scale = absmax(x) / 448`` over the calibration samples (so nothing clips on them; a
held-out value past that absmax saturates at +-448), ``w_scale = absmax(w) / 448``. The product is
``torch._scaled_mm`` (the low dtype out, the bias added in its epilogue): cuBLASLt's fp8 tensor-core GEMM on a
GPU of compute capability 8.9 or more, and on the CPU torch's reference kernel, which rounds as the GPU does,
its sums exact in fp32 (run there for tests and for the tolerance search; it is not fast).

:data:`FAST_ACCUM` is cuBLASLt's fast accumulation, torchao's choice for fp8 inference: Hopper's fp8 tensor cores
then skip the periodic promotion of their partial sums to fp32, which costs time and, at BERT's and an LLM's K
(768 to 5632), little accuracy next to e4m3's own rounding (3.8e-4 to 1.1e-3 against the exact e4m3 product, e4m3
itself 2.6e-2 to 3.7e-2 against fp32: the H100, runs AJ and AK, docs/perf.md "fp8 GEMMs"). On (run AK, H100,
2026-12-08: the GPU tests pass with it): the search runs its candidates with those kernels on a GPU compile
device, so the tolerance holds with the error they add (compiled on the CPU, whose kernel sums exactly, a plan
meant for a GPU carries up to ~1e-3 more a GEMM); cuBLASLt's bias epilogue without it ate the e4m3 gain where N
is small (BERT's q/k/v 0.99x, with it 1.39x).

Per-tensor scales: on the H100 (2026-12-06, docs/precision.md) they were the fastest of _scaled_mm's
scalings and no less accurate than row-wise ones (3.7% rel. L2 a GEMM either way: e4m3's 3 mantissa bits).
"""

from __future__ import annotations

import onnxscript.onnx_opset
import torch
import torch.fx
import torch.fx._pytree as fx_pytree

from mpcompiler.ir import record
from mpcompiler.samples import to_device

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448
SCALED_MM = torch.ops.aten._scaled_mm.default
FAST_ACCUM = True  # _scaled_mm's use_fast_accum (the CPU ignores it); benchmarks/gpu.py's experiment turns it off
ALIGN = 16  # _scaled_mm needs K and N (and the row strides) multiples of 16


def scale(absmax: float) -> float:
    """The per-tensor scale that maps ``absmax`` to e4m3's largest value."""
    return absmax / E4M3_MAX


def quantize(x: torch.Tensor, x_scale: float) -> torch.Tensor:
    """``x / x_scale`` in e4m3, saturating (computed in fp32)."""
    return (x.float() * (1.0 / x_scale)).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def linear(x8: torch.Tensor, w8: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor, bias, out_dtype):
    """``linear(x, w, bias)`` from e4m3 ``x8`` [..., K] and ``w8`` [N, K] (row-major), scales as 0-d fp32
    tensors: what an fp8 node computes, in the emitted graph (as these ATen ops) and in the search's runs."""
    flat = x8.reshape(-1, x8.shape[-1])
    out = torch._scaled_mm(
        flat, w8.t(), scale_a=x_scale, scale_b=w_scale, bias=bias, out_dtype=out_dtype, use_fast_accum=FAST_ACCUM
    )
    return out.reshape(*x8.shape[:-1], w8.shape[0])


def measure_saturation(gm: torch.fx.GraphModule, samples, device: torch.device) -> None:
    """Set ``fp8_saturated`` on each fp8 linear's record: the share of its input's values on ``samples`` (the
    held-out ones, compile()'s) past the calibrated absmax, which the quantization saturates at +-448. Even
    on the calibration samples a linear past the first may see a few: calibration ran in fp32, the plan's
    rounding upstream moves its input."""
    counts = {}  # lower_fp8's x8 = _to_copy(clamp(x * (1 / x_scale), -448, 448), e4m3) -> [past, values]
    for gemm in (n for n in gm.graph.nodes if n.target is SCALED_MM):
        counts[gemm.args[0].args[0]] = [0, 0]
    if not counts:  # the search kept every linear out of fp8
        return

    class Counting(torch.fx.Interpreter):
        def run_node(self, n):
            if n in counts:
                x = self.env[n.args[0]]
                counts[n] = [counts[n][0] + int((x.abs() > E4M3_MAX).sum()), counts[n][1] + x.numel()]
            return super().run_node(n)

    in_spec = gm.graph._codegen.pytree_info.in_spec
    with torch.no_grad():
        for sample in samples:
            Counting(gm).run(*fx_pytree.tree_flatten_spec(to_device(sample, device), in_spec))
    for gemm in (n for n in gm.graph.nodes if n.target is SCALED_MM):
        past, total = counts[gemm.args[0].args[0]]
        for linear in _linears(gemm):
            record(linear).fp8_saturated = past / total if total else 0.0


def _linears(gemm: torch.fx.Node) -> list[torch.fx.Node]:
    """The nodes holding the records of the linears ``gemm`` computes: itself, or where lower_fp8 joined
    several (its record then has no fp8 line of its own), the pieces of the split after it."""
    if record(gemm).fp8_reason:
        return [gemm]
    node = gemm
    for _ in range(2):  # past the reshape back to the input's leading dims, if any
        (node,) = node.users
        if node.target is torch.ops.aten.split_with_sizes.default:
            return list(node.users)
    raise AssertionError(f"{gemm.name}: an e4m3 GEMM without its linear's record")


def supported(device: torch.device) -> str | None:
    """Why ``device`` cannot run e4m3 GEMMs, or None if it can (the CPU runs torch's reference kernel)."""
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        return f"{device.type} has no e4m3 GEMM in torch"
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        return (
            f"{torch.cuda.get_device_name(device)} (compute capability {capability[0]}.{capability[1]}) has no fp8 "
            "tensor cores; torch._scaled_mm needs 8.9 or more (Ada, Hopper, Blackwell)"
        )
    return None


_OP = onnxscript.onnx_opset.opset20
_FLOAT16 = 10  # onnx.TensorProto.FLOAT16


def scaled_mm_onnx(self, mat2, scale_a, scale_b, bias=None, scale_result=None, out_dtype=None, use_fast_accum=False):
    """torch.onnx's translation of the GEMM above (plans of ``dtype="fp8"`` are fp16 elsewhere): each e4m3
    operand dequantized to fp16 (``DequantizeLinear`` with its scale in fp16: an e4m3 value times it rounds
    by at most 2^-11, against e4m3's own 2^-4), then an fp16 ``MatMul`` and the bias. ONNX Runtime runs it
    as an fp16 GEMM: the artifact carries e4m3 weights (half the bytes), not fp8 speed."""
    a = _OP.DequantizeLinear(self, _OP.Cast(scale_a, to=_FLOAT16))
    b = _OP.DequantizeLinear(mat2, _OP.Cast(scale_b, to=_FLOAT16))
    out = _OP.MatMul(a, b)
    return out if bias is None else _OP.Add(out, bias)
