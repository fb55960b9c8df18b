"""eliminate_casts: remove casts that cannot change a result, until none is left to remove.

Rewrite rules, each a check that says why it does not apply, and a rewrite:

- identity: ``cast(x, T)`` where x is already T -> x;
- exact chain: ``cast(cast(x, A), B)`` -> ``cast(x, B)`` when A holds every value of x's dtype
  (f16 -> f32 -> f16 is the identity; f32 -> f16 -> f32 is not: the inner cast rounds);
- duplicate: two casts of one value to one dtype -> the first;
- dead: a cast nobody reads -> gone.

A user's cast that widens (``x.float()`` of an fp16 value) changes values downstream and is kept.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx

from mpcompiler.ir import planned_dtype
from mpcompiler.ops import is_cast, written_dtype
from mpcompiler.pass_manager import Pass, PassResult, retype

# dtype -> dtypes that hold each of its values exactly
_EXACT = {
    torch.float16: {torch.float16, torch.float32, torch.float64},
    torch.bfloat16: {torch.bfloat16, torch.float32, torch.float64},
    torch.float32: {torch.float32, torch.float64},
    torch.float64: {torch.float64},
}


def _identity(node: torch.fx.Node) -> str:
    return "" if planned_dtype(node.args[0]) == written_dtype(node) else "changes dtype"


def _rewrite_identity(node: torch.fx.Node) -> None:
    node.replace_all_uses_with(node.args[0])
    node.graph.erase_node(node)


def _exact_chain(node: torch.fx.Node) -> str:
    inner = node.args[0]
    if not is_cast(inner):
        return "input is not a cast"
    src = planned_dtype(inner.args[0])
    if written_dtype(inner) not in _EXACT.get(src, ()):
        return f"inner cast {src} -> {written_dtype(inner)} rounds"
    return ""


def _rewrite_exact_chain(node: torch.fx.Node) -> None:
    node.replace_input_with(node.args[0], node.args[0].args[0])


def _dead(node: torch.fx.Node) -> str:
    return "" if not node.users else "has users"


def _rewrite_dead(node: torch.fx.Node) -> None:
    node.graph.erase_node(node)


RULES: list[tuple[str, Callable[[torch.fx.Node], str], Callable[[torch.fx.Node], None]]] = [
    ("identity", _identity, _rewrite_identity),
    ("exact_chain", _exact_chain, _rewrite_exact_chain),
    ("dead", _dead, _rewrite_dead),
]


class EliminateCasts(Pass):
    """Apply the cast rewrite rules (and merge duplicate casts) to a fixed point."""

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        stats = dict.fromkeys([name for name, _, _ in RULES] + ["duplicate"], 0)
        changed = True
        while changed:
            changed = False
            first: dict[tuple[torch.fx.Node, torch.dtype], torch.fx.Node] = {}
            for node in list(gm.graph.nodes):
                if not is_cast(node):
                    continue
                for name, check, rewrite in RULES:
                    if not check(node):
                        rewrite(node)
                        stats[name] += 1
                        changed = True
                        break
                else:
                    key = (node.args[0], written_dtype(node))
                    if key in first:  # graph order: the first cast of a value precedes every later one
                        node.replace_all_uses_with(first[key])
                        gm.graph.erase_node(node)
                        stats["duplicate"] += 1
                        changed = True
                    else:
                        first[key] = node
        modified = any(stats.values())
        if modified:
            gm.recompile()
            retype(gm)
        return PassResult(modified=modified, stats=stats)
