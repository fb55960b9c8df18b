"""lower_decode_step: a generation step rewritten into the decode graph of one batch size.

Runs on a copy of the generation program (``insert_kv_cache``'s step) for the CUDA graph of ``rows`` rows
(:meth:`mpcompiler.llm.Generator.decode_step`):

- the cache's row slices are dropped and the step's cache buffers become views of the cache's first
  ``rows`` rows, so that Inductor writes the cache in place, as gpt-fast's decode step does;
- each attention over the cache becomes ``softmax(q k^T) v`` (two batched GEMMs around one fused
  mask-and-softmax): SDPA's memory-efficient kernel runs one query block per key/value head, on one SM
  each: 36 us a layer for 1 row x 4 heads x 576 slots on the H200 (2026-12-02, benchmarks/profile_llm.py),
  44% of a decode step. The scale is applied to q first (the fp16 scores are then the logits themselves);
  the softmax runs in fp32, the GEMMs in q's dtype with fp32 accumulation, as the fused kernel computes;
- at one row, each gated MLP's ``SiLU(gate) x up`` is stored once before its down projection. There
  Inductor writes the down projection as a matrix-vector reduction and, left alone, recomputes SiLU x up
  from gate and up in each of its programs (512 for TinyLlama's shapes: 22 KB of reads each beside 45 KB
  of weights); stored (Inductor's force-stride-order prim realizes a buffer), the kernel reads 11 KB of it
  instead: 12.7 -> 9.2 us a layer, with one 1.2 us kernel added (H100, 2026-12-06, docs/llm.md run X);
- at one row, each e4m3 GEMM of a ``dtype="fp8"`` plan (lower_fp8) reads its input in the low dtype and its
  stored e4m3 weight dequantized (e4m3 x its scale, in the low dtype) inside Inductor's matrix-vector
  reduction: a decode step is bound by the bytes of its weights, which e4m3 halves, and quantizing one row
  to e4m3 buys nothing there. The prompt step and the decode graphs of more rows keep the e4m3 GEMMs.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensorMode

from mpcompiler import dtypes, fp8
from mpcompiler.ir import META_KEY, Rule, derived, record
from mpcompiler.pass_manager import Pass, PassResult, retype
from mpcompiler.passes.insert_kv_cache import SDPA
from mpcompiler.passes.lower_fp8 import quantized_input
from mpcompiler.rewrite import Match, RewriteRule, apply

aten = torch.ops.aten


def _cache_slice(node: torch.fx.Node) -> Match | str:
    if node.target is not aten.slice.Tensor:
        return "not a slice"
    return {} if record(node).rule is Rule.KV_CACHE else "not a slice of the KV cache"


def _drop(node: torch.fx.Node, m: Match) -> None:
    node.replace_all_uses_with(node.args[0])
    node.graph.erase_node(node)


def _attention(node: torch.fx.Node) -> Match | str:
    return {} if node.target is SDPA else "not attention over the KV cache"


def _as_matmuls(attention: torch.fx.Node, m: Match) -> None:
    graph = attention.graph
    q, k, v, visible = attention.args[:4]
    val = attention.meta["val"]
    scale = attention.kwargs.get("scale") or val.shape[-1] ** -0.5

    def call(op, *args, fp32=False, **kwargs):  # fp32: the node computes in fp32 (the softmax and its casts)
        node = graph.call_function(op, args, kwargs)
        node.meta[META_KEY] = derived(
            record(attention),
            dtype=torch.float32 if fp32 else record(attention).dtype,
            range=None,  # calibration saw the attention's output, not its scores or probabilities
            inner=None,
            fused="",
            rule=Rule.DECODE_ATTENTION,
            reason="one new token's attention as GEMMs over the cache's slots (faster than SDPA's kernel)",
        )
        return node

    with graph.inserting_before(attention):
        scores = call(aten.matmul.default, call(aten.mul.Tensor, q, scale), call(aten.transpose.int, k, -2, -1))
        scores = call(aten._to_copy.default, scores, dtype=torch.float32, fp32=True)
        hidden = call(aten.logical_not.default, visible)
        scores = call(aten.masked_fill.Scalar, scores, hidden, float("-inf"), fp32=True)
        probs = call(aten._to_copy.default, call(aten._softmax.default, scores, -1, False, fp32=True), dtype=val.dtype)
        out = call(aten.matmul.default, probs, v)
    record(out).range, record(out).inner = record(attention).range, record(attention).inner
    attention.replace_all_uses_with(out)
    graph.erase_node(attention)


def _fp8_gemm(node: torch.fx.Node) -> Match | str:
    if node.target is not fp8.SCALED_MM:
        return "not an e4m3 GEMM"
    x = quantized_input(node)
    if x is None:
        return "its input is not lower_fp8's quantization"
    w8 = node.args[1].args[0] if getattr(node.args[1], "target", None) is aten.t.default else None
    if w8 is None or w8.op != "get_attr":
        return "its weight is not a stored e4m3 tensor"
    return {"x": x, "w8": w8, "w_scale": node.args[3], "bias": node.args[4] if len(node.args) > 4 else None}


def _weights_only(gemm: torch.fx.Node, m: Match) -> None:
    graph, rec = gemm.graph, record(gemm)

    def call(planned, op, *args, **kwargs):  # planned: the new node's dtype in the plan
        node = graph.call_function(op, args, kwargs)
        node.meta[META_KEY] = derived(rec, dtype=planned, fused=FP8_WEIGHTS, fp8=None, fp8_reason="", range=None,
                                      inner=None, flops=None)  # fmt: skip
        node.meta[META_KEY].inserted = True  # the weight's dequantization: mpcompiler's, not the model's op
        return node

    with graph.inserting_before(gemm):  # Inductor inlines these into the reduction's loads of the e4m3 weight
        w = call(torch.float32, aten._to_copy.default, m["w8"], dtype=torch.float32)
        w = call(rec.dtype, aten._to_copy.default, call(torch.float32, aten.mul.Tensor, w, m["w_scale"]),
                 dtype=rec.dtype)  # fmt: skip
        out = graph.call_function(aten.linear.default, (m["x"], w, m["bias"]))
    why = f"fp8 weight only: w / {rec.fp8.w_scale:.4g} in e4m3, its input in {dtypes.short(rec.dtype)} (one row)"
    out.meta[META_KEY] = derived(rec, fused=FP8_WEIGHTS, fp8_reason=why)
    gemm.replace_all_uses_with(out)
    graph.erase_node(gemm)


def _gated_activation(node: torch.fx.Node) -> Match | str:
    if node.target is not aten.linear.default:
        return "not a linear"
    reader, act = node, node.args[0]
    if getattr(act, "target", None) is aten.reshape.default:  # an fp8 plan's linear reads it flattened
        reader, act = act, act.args[0]
    if getattr(act, "target", None) is not aten.mul.Tensor:
        return "its input is not a product"
    if not any(getattr(a, "target", None) is aten.silu.default for a in act.args):
        return "its input is not SiLU(gate) x up"
    return {"act": act, "reader": reader}


def _store(linear: torch.fx.Node, m: Match) -> None:
    import torch._inductor.inductor_prims  # noqa: F401  (registers prims.inductor_force_stride_order)

    act = m["act"]
    shape = act.meta["val"].shape
    strides = [int(torch.Size(shape[i + 1 :]).numel()) for i in range(len(shape))]  # contiguous
    with linear.graph.inserting_before(m["reader"]):
        stored = linear.graph.call_function(torch.ops.prims.inductor_force_stride_order.default, (act, strides))
    stored.meta.update(act.meta)
    stored.meta[META_KEY] = derived(
        record(act), rule=Rule.DECODE_ACTIVATION, reason="stored once for the down projection's kernel"
    )
    m["reader"].replace_input_with(act, stored)


RULES = [
    RewriteRule("cache_slices_dropped", _cache_slice, _drop, "the cache's row slice -> the cache's row view"),
    RewriteRule("attention_as_matmuls", _attention, _as_matmuls, "attention over the cache -> 2 GEMMs + softmax"),
]
# at one row only, in two rounds (the second sees the linears the first wrote): one row's matmuls are
# Inductor's matrix-vector reductions, which read a stored e4m3 weight at half fp16's bytes, where cuBLASLt's
# fp8 GEMM runs a 1-row product 14% slower than fp16's (docs/precision.md); then the down projection's
# activation. With more rows the down projection is cuBLAS's GEMM, into which Inductor fuses nothing, so SiLU x
# up is stored anyway, and the e4m3 GEMMs stay.
ONE_ROW_ROUNDS = [
    [RewriteRule("fp8_weights_only", _fp8_gemm, _weights_only, "e4m3 GEMM -> low-dtype input x dequantized weight")],
    [RewriteRule("activations_stored", _gated_activation, _store, "SiLU(gate) x up -> stored once")],
]
FP8_WEIGHTS = "e4m3 weight, low-dtype input (lower_decode_step)"


class LowerDecodeStep(Pass):
    """The generation step over the cache's first rows, as its decode CUDA graph compiles it: ``example``
    holds the step's tensor inputs at the graph's fixed shapes (``rows`` rows of one new token); the graph
    is typed at those shapes (a graph that writes its rows of the cache in place is one batch size's)."""

    requires = ("kv_cache",)
    rewrites_graph = True

    def __init__(self, *, example: dict[str, torch.Tensor]):
        self.example = example
        self.rows = len(example["input_ids"])

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        for name, buffer in list(gm.named_buffers()):
            if name.startswith("kv_cache_"):
                gm.register_buffer(name, buffer[: self.rows])
        static = FakeTensorMode(allow_non_fake_inputs=True)  # the weights stay real, as in the export's mode
        for node in gm.graph.nodes:
            if node.op == "placeholder" and node.target in self.example:
                node.meta["val"] = static.from_tensor(self.example[node.target])
        retype(gm)  # the rules read the graph's own shapes, not the step's dynamic ones
        rounds = [RULES + ONE_ROW_ROUNDS[0], *ONE_ROW_ROUNDS[1:]] if self.rows == 1 else [RULES]
        reasons: dict = {}
        fired = Counter()
        for rules in rounds:
            fired += apply([n for n in gm.graph.nodes if n.op == "call_function"], rules, reasons)
        gm.graph.eliminate_dead_code()
        stats = {"rows": self.rows} | {rule.name: fired[rule.name] for rules in rounds for rule in rules}
        return PassResult(modified=True, stats=stats, reasons=reasons)
