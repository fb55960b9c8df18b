"""lower_fp8: each linear the plan puts in fp8 becomes an e4m3 GEMM, its weight stored once in e4m3.

After insert_casts (the linear's input, weight and bias are then in its low dtype), a linear with an
``fp8`` record (assign_fp8) is rewritten as :func:`mpcompiler.fp8.linear` computes it::

    x8 = _to_copy(clamp(_to_copy(x.reshape(-1, K), f32) * (1 / x_scale), -448, 448), e4m3)
    y  = _scaled_mm(x8, w8.t(), x_scale, w_scale, bias, out_dtype=<low>, use_fast_accum).reshape(..., N)

``w8`` (the weight quantized once, from the planned dtype's copy that insert_casts made) and the two 0-d
fp32 scales become buffers beside the weight, which goes when nothing else reads it. Inductor fuses the
input's quantization into the kernel that produces it; ``_scaled_mm`` is cuBLASLt's fp8 GEMM.

First, the fp8 linears of one input (which assign_fp8 gave one weight scale) are joined as lower_fused joins
fp16 ones (``shared_input_linears``: one linear over their stacked weights, then a split), so that a layer's
q, k and v are one quantization of its input and one e4m3 GEMM. The joined linear's pieces keep each
linear's record (its fp8 line in the report and the dumps); the GEMM itself adds none.
"""

from __future__ import annotations

import torch
import torch.fx

from mpcompiler import fp8
from mpcompiler.ir import META_KEY, attr_of, derived, record
from mpcompiler.pass_manager import Pass, PassResult
from mpcompiler.passes.lower_fused import FUSED_LINEARS, join_linears, match_shared_input_linears
from mpcompiler.rewrite import Match, RewriteRule, apply

aten = torch.ops.aten
FUSED = "linear -> e4m3 GEMM (lower_fp8)"


def _fp8_linear(node: torch.fx.Node) -> Match | str:
    if node.target is not aten.linear.default:
        return "not a linear"
    if record(node).fp8 is None:
        return "not planned in fp8"
    return {"x": node.args[0], "weight": node.args[1], "bias": node.args[2] if len(node.args) > 2 else None}


def _fp8_group(node: torch.fx.Node) -> Match | str:
    if getattr(node.meta.get(META_KEY), "fp8", None) is None:
        return "not planned in fp8"
    return match_shared_input_linears(node)


def _join(linear: torch.fx.Node, m: Match) -> None:
    first = join_linears(linear.graph.owning_module, linear, m)  # the first linear's piece of the split
    split = first.args[0]
    for node in (split, split.args[0]):  # the joined linear (lowered below) and its split: no linear's own line
        record(node).fp8_reason = ""
    first.meta["val"] = linear.meta.get("val")
    first.meta[META_KEY] = derived(record(linear), fused=FUSED_LINEARS)
    linear.replace_all_uses_with(first)


_QUANTIZATION = (aten._to_copy.default, aten.clamp.default, aten.mul.Tensor, aten._to_copy.default)


def quantized_input(gemm: torch.fx.Node) -> torch.fx.Node | None:
    """The value an e4m3 GEMM's input quantizes (flattened to 2-D where the linear's was not), back through the
    quantization ``_as_gemm`` writes; None where its input is not that."""
    x = gemm.args[0]
    for op in _QUANTIZATION:
        if getattr(x, "target", None) is not op:
            return None
        x = x.args[0]
    return x


def _register(gm: torch.fx.GraphModule, like: str, suffix: str, tensor: torch.Tensor) -> str:
    """A buffer beside the attribute ``like`` (``<like>_<suffix>``); returns its target."""
    owner_path, _, name = like.rpartition(".")
    gm.get_submodule(owner_path).register_buffer(f"{name}_{suffix}", tensor)
    return f"{like}_{suffix}"


def _as_gemm(linear: torch.fx.Node, m: Match) -> None:
    graph, rec = linear.graph, record(linear)
    gm, weight = graph.owning_module, m["weight"]
    scales = rec.fp8
    w = attr_of(gm, weight.target)
    targets = {
        "w8": _register(gm, weight.target, "e4m3", fp8.quantize(w.detach(), scales.w_scale)),
        "ws": _register(gm, weight.target, "e4m3_scale", torch.tensor(scales.w_scale, device=w.device)),
        # per linear: two linears may read one weight, each with its own input
        "xs": _register(
            gm,
            weight.target,
            "x_scale" if weight.users.keys() == {linear} else f"x_scale_{linear.name}",
            torch.tensor(scales.x_scale, device=w.device),
        ),  # fmt: skip
    }

    def node(planned, op, *args, **kwargs):  # planned: the new node's dtype in the plan
        n = graph.get_attr(args[0]) if op == "get_attr" else graph.call_function(op, args, kwargs)
        n.meta[META_KEY] = derived(
            rec, dtype=planned, fused=FUSED, fp8=None, fp8_reason="", range=None, inner=None, flops=None
        )
        n.meta[META_KEY].inserted = True  # the quantization's steps: mpcompiler's, not the model's ops
        return n

    x = m["x"]
    shape = x.meta["val"].shape
    with graph.inserting_before(linear):
        w8, ws, xs = (node(d, "get_attr", targets[t]) for t, d in
                      (("w8", fp8.E4M3), ("ws", torch.float32), ("xs", torch.float32)))  # fmt: skip
        flat = node(rec.dtype, aten.reshape.default, x, [-1, shape[-1]]) if len(shape) != 2 else x  # before e4m3:
        x8 = node(torch.float32, aten._to_copy.default, flat, dtype=torch.float32)  # ORT has no e4m3 Reshape
        x8 = node(torch.float32, aten.mul.Tensor, x8, 1.0 / scales.x_scale)
        x8 = node(torch.float32, aten.clamp.default, x8, -fp8.E4M3_MAX, fp8.E4M3_MAX)
        flat = node(fp8.E4M3, aten._to_copy.default, x8, dtype=fp8.E4M3)
        wt = node(fp8.E4M3, aten.t.default, w8)
        out = gemm = node(rec.dtype, fp8.SCALED_MM, flat, wt, xs, ws, m["bias"], None, rec.dtype, fp8.FAST_ACCUM)
        if len(shape) != 2:
            lead = [d if isinstance(d, int) else node(None, aten.sym_size.int, x, i) for i, d in enumerate(shape[:-1])]
            out = node(rec.dtype, aten.reshape.default, gemm, [*lead, w.shape[0]])
            record(out).range = rec.range
    gemm.meta[META_KEY] = derived(rec, fused=FUSED)  # the linear's facts, its fp8 scales and reason included
    linear.replace_all_uses_with(out)
    graph.erase_node(linear)


# in two rounds: the joined linears are lowered by the second
RULES = [
    RewriteRule("fp8_linears_joined", _fp8_group, _join, "fp8 linears of one input -> one linear + split"),
    RewriteRule("fp8_linear", _fp8_linear, _as_gemm, "linear planned in fp8 -> quantize + _scaled_mm"),
]


class LowerFp8(Pass):
    """Write the plan's fp8 linears as e4m3 GEMMs."""

    requires = ("casts",)
    rewrites_graph = True

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        reasons, fired, weights = {}, {}, set()
        for rule in RULES:
            nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
            weights |= {n.args[1].target for n in nodes if not isinstance(_fp8_linear(n), str)}
            fired |= apply(nodes, [rule], reasons)
            gm.graph.eliminate_dead_code()  # the linears a join replaced
        for target in weights - {n.target for n in gm.graph.nodes if n.op == "get_attr"}:
            owner_path, _, name = target.rpartition(".")
            delattr(gm.get_submodule(owner_path), name)  # a weight only its e4m3 copy reads now: stored once
        return PassResult(modified=bool(fired.get("fp8_linear")), stats=dict(fired), reasons=reasons)
