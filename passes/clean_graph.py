"""clean_graph: make the exported graph plain dataflow before precision work.

- drops ``_assert_tensor_metadata`` checks (they pin dtypes that later passes change on purpose);
- drops inference-mode dropout (an identity);
- drops casts that are no-ops in the captured program: torch.export writes ``x.to(device)`` as
  ``to(x, dtype=float32, device=...)``, which looks like a user's ``.float()``. Only casts that
  convert (f16 -> f32 in a model with fp16 parts, int -> float) stay, and keep their dtype;
- writes ``view`` as ``reshape``: torch.export records a ``.contiguous().view()`` as a bare ``view``
  when the traced kernel's output happened to be contiguous (SDPA's fused kernels return a
  transposed layout); another backend, device or dtype returns another layout, and the view fails.
  ``reshape`` is the same view where the layout allows it and a copy where it does not;
- removes dead code.
"""

from __future__ import annotations

import torch
import torch.fx

from mpcompiler.ir import float_dtype, op_name
from mpcompiler.ops import is_cast, written_dtype
from mpcompiler.pass_manager import Pass, PassResult
from mpcompiler.rewrite import Match, RewriteRule, apply

aten = torch.ops.aten
_DROPOUTS = {"dropout", "feature_dropout", "alpha_dropout"}
_VIEWS = (aten.view.default, aten._unsafe_view.default)


def _assert(node: torch.fx.Node) -> Match | str:
    return {} if node.target is aten._assert_tensor_metadata.default else "not a metadata assert"


def _dropout(node: torch.fx.Node) -> Match | str:
    if op_name(node) not in _DROPOUTS:
        return "not a dropout"
    return "in training mode" if _training(node) else {}


def _noop_cast(node: torch.fx.Node) -> Match | str:
    if not is_cast(node):
        return "not a cast"
    return {} if written_dtype(node) == float_dtype(node.args[0].meta.get("val")) else "converts"


def _view(node: torch.fx.Node) -> Match | str:
    return {} if node.target in _VIEWS else "not a view"


def _erase(node: torch.fx.Node, m: Match) -> None:
    node.graph.erase_node(node)


def _bypass(node: torch.fx.Node, m: Match) -> None:
    node.replace_all_uses_with(node.args[0])
    node.graph.erase_node(node)


def _reshape(node: torch.fx.Node, m: Match) -> None:
    node.target = aten.reshape.default


RULES = [
    RewriteRule("asserts_removed", _assert, _erase, "export's dtype assert -> gone"),
    RewriteRule("dropouts_removed", _dropout, _bypass, "eval-mode dropout -> its input"),
    RewriteRule("noop_casts_removed", _noop_cast, _bypass, "a cast to the dtype its input has -> its input"),
    RewriteRule("views_reshaped", _view, _reshape, "view -> reshape"),
]


class CleanGraph(Pass):
    """Remove export's dtype asserts, eval-mode dropout, no-op casts and dead code; views become reshapes."""

    rewrites_graph = True

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        reasons: dict = {}
        fired = apply([n for n in gm.graph.nodes if n.op == "call_function"], RULES, reasons)
        stats = {rule.name: fired[rule.name] for rule in RULES}
        before = len(gm.graph.nodes)
        gm.graph.eliminate_dead_code()
        stats["dead_removed"] = before - len(gm.graph.nodes)
        return PassResult(modified=any(stats.values()), stats=stats, reasons=reasons)


def _training(node: torch.fx.Node) -> bool:
    train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
    return bool(train)
