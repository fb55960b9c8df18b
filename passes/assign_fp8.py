"""assign_fp8: which linears read e4m3 inputs (``compile(dtype="fp8")``), and why or why not.

The precision lattice's lowest level, below assign_precision's low dtype: a linear the plan puts in fp16
whose weight is a parameter and whose dims suit ``torch._scaled_mm`` reads its input and its weight in
float8_e4m3fn, with static per-tensor scales from calibration (:mod:`mpcompiler.fp8`); its output stays
in the low dtype. A linear stays out of fp8, with the reason in its record (``fp8_reason``), when:

- the plan keeps it out of the low dtype (a range rule, keep_fp32, the search: its dtype's reason says so);
- its weight is not a parameter (a product of two activations has no static weight scale);
- its input or output dims are not multiples of 16 (``_scaled_mm``'s alignment);
- calibration saw no finite, nonzero magnitude of its input (no scale);
- the tolerance search keeps it in the low dtype (``fp8_promoted``, search_precision's first stage), with the
  other linears of its input (they run as one GEMM, which a plan of e4m3 and fp16 halves would split in two).

The fp8 linears of one input (a layer's q, k and v; gate and up) share one weight scale, their largest: lower_fp8
joins them into one GEMM over their stacked weights, as lower_fused joins fp16 ones (one quantization of the
input, one GEMM of the summed width: fewer, larger kernels). e4m3 is a float, so a larger scale costs only
weights below 2^-6 of it, which turn subnormal; the search's runs (planned_call) use the shared scale too.

Runs after assign_precision, in the pipeline and in the search's re-plan; lower_fp8 writes the GEMMs.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.fx

from mpcompiler import dtypes, fp8
from mpcompiler.ir import Fp8Scales, attr_of, graph_record, record
from mpcompiler.pass_manager import Pass, PassResult

aten = torch.ops.aten


def _problem(node: torch.fx.Node) -> str | None:
    """Why the linear ``node``, planned in a low dtype, cannot read e4m3 inputs; None if it can."""
    x, weight = node.args[0], node.args[1]
    if not isinstance(weight, torch.fx.Node) or weight.op != "get_attr":
        return "its weight is not a parameter"
    n, k = weight.meta["val"].shape if weight.meta["val"].dim() == 2 else (0, 0)
    if n % fp8.ALIGN or k % fp8.ALIGN:
        return f"its weight is {n} x {k}; torch._scaled_mm needs both dims multiples of {fp8.ALIGN}"
    r = record(x).range if isinstance(x, torch.fx.Node) else None
    if r is None or not math.isfinite(r.absmax) or r.absmax <= 0 or r.nan or r.inf:
        return "calibration saw no finite, nonzero magnitude of its input to scale it by"
    return None


def gemm_group(node: torch.fx.Node) -> tuple:
    """What the fp8 linears that run as one GEMM share: their input, dtype and whether they have a bias."""
    return node.args[0], record(node).dtype, len(node.args) > 2 and node.args[2] is not None


def _short(node: torch.fx.Node) -> str:
    """A linear's name in a reason: its module's (``k_proj``), else its node's."""
    return (record(node).module_path or node.name).rpartition(".")[2]


class AssignFp8(Pass):
    """Mark the linears that run as e4m3 GEMMs, with their scales."""

    requires = ("plan",)

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        graph_record(gm).fp8 = True
        counts = {"fp8": 0, "low": 0}
        groups: dict[tuple, list[torch.fx.Node]] = {}  # (input, dtype, bias or not) -> its fp8 linears
        for node in gm.graph.nodes:
            if node.op != "call_function" or node.target is not aten.linear.default:
                continue
            rec = record(node)
            rec.fp8, rec.fp8_reason = None, ""
            if rec.dtype not in dtypes.LOW:
                continue  # not a level below its dtype: its dtype's reason says why
            problem = rec.fp8_promoted or _problem(node)
            if problem:
                rec.fp8_reason = f"not fp8: {problem}"
                counts["low"] += 1
                continue
            x_absmax = record(node.args[0]).range.absmax
            w_absmax = float(attr_of(gm, node.args[1].target).detach().abs().max())
            rec.fp8 = Fp8Scales(x_scale=fp8.scale(x_absmax), w_scale=fp8.scale(w_absmax or 1.0))
            groups.setdefault(gemm_group(node), []).append(node)
            counts["fp8"] += 1
        for (x, *_), group in groups.items():  # linears of one input: one weight scale, the largest (see above)
            w_scale = max(record(n).fp8.w_scale for n in group)
            for node in group:
                rec = record(node)
                rec.fp8 = dataclasses.replace(rec.fp8, w_scale=w_scale)
                others = [_short(n) for n in group if n is not node]
                rec.fp8_reason = (
                    f"fp8: x / {rec.fp8.x_scale:.3g} (calibrated absmax {record(x).range.absmax:.4g} -> 448, past it "
                    f"saturates), w / {w_scale:.3g}" + (f" (one GEMM with {', '.join(others)})" if others else "")
                )
        return PassResult(modified=True, stats=counts)
