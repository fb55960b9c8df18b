"""eliminate_casts: remove casts that cannot change a result, until none is left to remove.

Rewrite rules (mpcompiler.rewrite: a match that says why it does not apply, and a rewrite):

- identity: ``cast(x, T)`` where x is already T -> x;
- exact chain: ``cast(cast(x, A), B)`` -> ``cast(x, B)`` when A holds every value of x's dtype
  (f16 -> f32 -> f16 is the identity; f32 -> f16 -> f32 is not: the inner cast rounds);
- duplicate: two casts of one value to one dtype -> the first;
- dead: a cast nobody reads -> gone.

A user's cast that widens (``x.float()`` of an fp16 value) changes values downstream and is kept.
"""

from __future__ import annotations

import torch
import torch.fx

from mpcompiler import dtypes
from mpcompiler.ir import planned_dtype
from mpcompiler.ops import is_cast, written_dtype
from mpcompiler.pass_manager import Pass, PassResult
from mpcompiler.rewrite import Match, RewriteRule, apply

# dtype -> dtypes that hold each of its values exactly
_EXACT = {
    torch.float16: {torch.float16, torch.float32, torch.float64},
    torch.bfloat16: {torch.bfloat16, torch.float32, torch.float64},
    torch.float32: {torch.float32, torch.float64},
    torch.float64: {torch.float64},
}


def _identity(node: torch.fx.Node) -> Match | str:
    return {} if planned_dtype(node.args[0]) == written_dtype(node) else "changes dtype"


def _rewrite_identity(node: torch.fx.Node, m: Match) -> None:
    node.replace_all_uses_with(node.args[0])
    node.graph.erase_node(node)


def _exact_chain(node: torch.fx.Node) -> Match | str:
    inner = node.args[0]
    if not is_cast(inner):
        return "input is not a cast"
    src = planned_dtype(inner.args[0])
    if written_dtype(inner) not in _EXACT.get(src, ()):
        return f"inner cast {dtypes.short(src)} -> {dtypes.short(written_dtype(inner))} rounds"
    return {}


def _rewrite_exact_chain(node: torch.fx.Node, m: Match) -> None:
    node.replace_input_with(node.args[0], node.args[0].args[0])


def _duplicate(node: torch.fx.Node) -> Match | str:
    value, dtype = node.args[0], written_dtype(node)
    for other in value.users:  # an earlier cast of the same value to the same dtype
        if other is not node and other < node and is_cast(other) and written_dtype(other) == dtype:
            return {"first": other}
    return "the first cast of its value to its dtype"


def _rewrite_duplicate(node: torch.fx.Node, m: Match) -> None:
    node.replace_all_uses_with(m["first"])
    node.graph.erase_node(node)


def _dead(node: torch.fx.Node) -> Match | str:
    return {} if not node.users else "has users"


def _rewrite_dead(node: torch.fx.Node, m: Match) -> None:
    node.graph.erase_node(node)


RULES = [
    RewriteRule("identity", _identity, _rewrite_identity, "cast(x, T) where x is T -> x"),
    RewriteRule("exact_chain", _exact_chain, _rewrite_exact_chain, "cast(cast(x, A), B) -> cast(x, B), A exact"),
    RewriteRule("dead", _dead, _rewrite_dead, "a cast nobody reads -> gone"),
    RewriteRule("duplicate", _duplicate, _rewrite_duplicate, "a second cast of x to T -> the first"),
]


class EliminateCasts(Pass):
    """Apply the cast rewrite rules to a fixed point."""

    requires = ("casts",)
    rewrites_graph = True

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        stats, reasons = dict.fromkeys([rule.name for rule in RULES], 0), {}
        while fired := apply([n for n in gm.graph.nodes if is_cast(n)], RULES, reasons):
            for name, count in fired.items():
                stats[name] += count
        return PassResult(modified=any(stats.values()), stats=stats, reasons=reasons)
