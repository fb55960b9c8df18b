"""lower_prompt_step: a generation step rewritten into the prompt step of prompts without padding.

Runs on a copy of the generation program (``insert_kv_cache``'s step) for a prompt written at the cache's
first slots (``cache_position`` 0..T-1, nothing before it visible) with no row padded
(:meth:`mpcompiler.llm.Generator.__call__` with ``causal=True``, what ``generate`` runs for a prompt of two
or more tokens whose ``attention_mask`` is all ones): each attention over the cache becomes
causal attention over the prompt's own keys and values (SDPA with ``is_causal``: its flash kernel on the
GPU); the cache still receives them. Over the cache a prompt's attention reads all ``max_seq`` slots under
a mask (SDPA's memory-efficient kernel, computing every slot past the prompt and every query's future before
masking them): 0.96 ms of a 512-token prompt step's 3.48 ms of kernels on the H100 with 576 slots
(2026-12-07, docs/perf.md). With grouped-query attention each key/value head is repeated for its query
heads (as HF's ``repeat_kv``): flash needs no mask then, where the cache's grouped layout folds the queries
of a group into one sequence that a causal mask would misread.

``generate`` reads the prompt step's logits at its last position alone, so the LM head reads the last
position's hidden state only (as Hugging Face's ``generate`` passes ``logits_to_keep=1``): 512 x 32,000
logits are a GEMM of 67 GFLOP and 65 MB of fp32 written for a TinyLlama-shaped 512-token prompt.
"""

from __future__ import annotations

import sys

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch.fx.experimental.symbolic_shapes import statically_known_true

from mpcompiler import fp8
from mpcompiler.accuracy import output_names
from mpcompiler.ir import META_KEY, Rule, derived, record
from mpcompiler.pass_manager import Pass, PassResult
from mpcompiler.passes.insert_kv_cache import SDPA
from mpcompiler.passes.lower_fp8 import quantized_input
from mpcompiler.rewrite import Match, RewriteRule, apply

aten = torch.ops.aten


def _cache_attention(node: torch.fx.Node) -> Match | str:
    if node.target is not SDPA:
        return "not attention"
    keys, values = node.args[1:3]
    if not all(getattr(x, "target", None) is aten.index_put_.default for x in (keys, values)):
        return "its keys and values are not written into the KV cache"
    q, k, v = node.args[0], keys.args[2], values.args[2]
    if getattr(q, "target", None) is aten.reshape.default and record(q).rule is Rule.KV_CACHE:
        q = q.args[0]  # insert_kv_cache's grouped layout, [B, kv_heads, group x T, d]: back to [B, heads, T, d]
    (heads, length), (kv_heads, new) = (q.meta["val"].shape[1:3], k.meta["val"].shape[1:3])
    if heads % kv_heads or not statically_known_true(length == new):
        return "its queries are not one per new key (a layout between the grouping and the attention)"
    return {"q": q, "k": k, "v": v}


def _causal(attention: torch.fx.Node, m: Match) -> None:
    graph = attention.graph
    q, k, v = m["q"], m["k"], m["v"]
    heads, kv_heads = int(q.meta["val"].shape[1]), int(k.meta["val"].shape[1])

    def call(op, *args):
        node = graph.call_function(op, args)
        why = "a key/value head repeated for its query heads (causal prompt attention)"
        node.meta[META_KEY] = derived(record(k), rule=Rule.PROMPT_STEP, range=None, inner=None, fused="",
                                      reason=why)  # fmt: skip
        return node

    with graph.inserting_before(attention):
        if heads != kv_heads:
            rows, length = call(aten.sym_size.int, k, 0), call(aten.sym_size.int, k, 2)
            dim = int(k.meta["val"].shape[3])

            def repeat(x):
                wide = call(aten.expand.default, call(aten.unsqueeze.default, x, 2),
                            [-1, -1, heads // kv_heads, -1, -1])  # fmt: skip
                return call(aten.reshape.default, wide, [rows, heads, length, dim])

            k, v = repeat(k), repeat(v)
    attention.args = (q, k, v)
    attention.kwargs = {"is_causal": True, "scale": attention.kwargs.get("scale")}  # its record (dtype, why) stays


# what may lie between the LM head and the logits (casts, lower_fp8's reshape back, a soft cap)
_AFTER_HEAD = frozenset({aten._to_copy.default, aten.reshape.default, aten.view.default, aten.mul.Tensor,
                         aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar, aten.tanh.default})  # fmt: skip


def _logits(node: torch.fx.Node) -> Match | str:
    if node.op != "output":
        return "not the output"
    names = output_names(node.graph.owning_module)
    if "logits" not in names:
        return "no output named logits"
    head = logits = pytree.tree_leaves(node.args[0])[names.index("logits")]
    while getattr(head, "target", None) in _AFTER_HEAD:
        head = head.args[0]
    if getattr(head, "target", None) is aten.linear.default:
        x = head.args[0]
    elif getattr(head, "target", None) is fp8.SCALED_MM:
        x = quantized_input(head)
        if x is None:
            return "the LM head's e4m3 input is not lower_fp8's quantization"
        x = x.args[0] if getattr(x, "target", None) is aten.reshape.default else x  # before the flattening
    else:
        return "the logits are not a linear's output (through casts, reshapes, a soft cap)"
    if x.meta["val"].dim() != 3:
        return "the LM head's input is not [batch, positions, hidden]"
    upstream, stack = {logits}, [logits]  # x's readers on the way to the logits: the LM head's (its sizes too)
    while stack:
        for n in stack.pop().all_input_nodes:
            if n not in upstream:
                upstream.add(n)
                stack.append(n)
    return {"x": x, "readers": [u for u in x.users if u in upstream]}


def _last_position(output: torch.fx.Node, m: Match) -> None:
    graph, x = output.graph, m["x"]
    with graph.inserting_after(x):
        last = graph.call_function(aten.slice.Tensor, (x, 1, -1, sys.maxsize))
    why = "the last position's hidden state: generate reads its logits alone"
    last.meta[META_KEY] = derived(record(x), range=None, inner=None, fused="", rule=Rule.PROMPT_STEP, reason=why)
    for reader in m["readers"]:
        reader.replace_input_with(x, last)


RULES = [
    RewriteRule("causal_attention", _cache_attention, _causal, "attention over the cache -> causal over the prompt"),
    RewriteRule("last_logits", _logits, _last_position, "the LM head over every position -> over the last"),
]


class LowerPromptStep(Pass):
    """The generation step for prompts that fill an empty cache and have no padding: each attention causal
    over the prompt's own keys and values, which are still written into the cache; the LM head over the last
    position alone."""

    requires = ("kv_cache",)
    rewrites_graph = True

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        reasons: dict = {}
        fired = apply([n for n in gm.graph.nodes if n.op in ("call_function", "output")], RULES, reasons)
        # the slot mask and the grouped queries are dead; the cache writes are not (nothing reads them here)
        gm.graph.eliminate_dead_code(lambda n: n.is_impure() or n.target is aten.index_put_.default)
        stats = {rule.name: fired[rule.name] for rule in RULES}
        return PassResult(modified=bool(sum(fired.values())), stats=stats, reasons=reasons)
