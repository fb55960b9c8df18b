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

aten = torch.ops.aten
_DROPOUTS = {"dropout", "feature_dropout", "alpha_dropout"}
_VIEWS = (aten.view.default, aten._unsafe_view.default)


class CleanGraph(Pass):
    """Remove export's dtype asserts, eval-mode dropout, no-op casts and dead code; views become reshapes."""

    rewrites_graph = True

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        graph = gm.graph
        stats = {"asserts_removed": 0, "dropouts_removed": 0, "noop_casts_removed": 0, "views_reshaped": 0}
        for node in list(graph.nodes):
            if node.op != "call_function":
                continue
            if node.target is aten._assert_tensor_metadata.default:
                graph.erase_node(node)
                stats["asserts_removed"] += 1
            elif op_name(node) in _DROPOUTS and not _training(node):
                node.replace_all_uses_with(node.args[0])
                graph.erase_node(node)
                stats["dropouts_removed"] += 1
            elif is_cast(node) and written_dtype(node) == float_dtype(node.args[0].meta.get("val")):
                node.replace_all_uses_with(node.args[0])
                graph.erase_node(node)
                stats["noop_casts_removed"] += 1
            elif node.target in _VIEWS:
                node.target = aten.reshape.default
                stats["views_reshaped"] += 1
        before = len(graph.nodes)
        graph.eliminate_dead_code()
        stats["dead_removed"] = before - len(graph.nodes)
        return PassResult(modified=any(stats.values()), stats=stats)


def _training(node: torch.fx.Node) -> bool:
    train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
    return bool(train)
