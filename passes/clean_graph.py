"""clean_graph: make the exported graph plain dataflow before precision work.

- drops ``_assert_tensor_metadata`` checks (they pin dtypes that later passes change on purpose);
- drops inference-mode dropout (an identity);
- drops casts that are no-ops in the captured program: torch.export writes ``x.to(device)`` as
  ``to(x, dtype=float32, device=...)``, which looks like a user's ``.float()``. Only casts that
  convert (f16 -> f32 in a model with fp16 parts, int -> float) stay, and keep their dtype;
- rewrites in-place ops (``relu_``, ``add_``) out of place, so a node's dtype can differ from its
  input's; later readers of the mutated value read the new node instead;
- removes dead code.
"""

from __future__ import annotations

import torch
import torch.fx

from mpcompiler.errors import CaptureError
from mpcompiler.ir import float_dtype, module_path, op_name
from mpcompiler.ops import is_cast, written_dtype
from mpcompiler.pass_manager import Pass, PassResult

aten = torch.ops.aten
_DROPOUTS = {"dropout", "feature_dropout", "alpha_dropout"}


def _functional(target: torch._ops.OpOverload) -> torch._ops.OpOverload | None:
    """``aten.add_.Tensor`` -> ``aten.add.Tensor`` (None if there is no such overload)."""
    name = target._schema.name.split("::")[1]
    if not name.endswith("_") or name.startswith("_"):
        return None
    packet = getattr(aten, name[:-1], None)
    overload = target._overloadname
    return getattr(packet, overload, None) if packet is not None else None


class CleanGraph(Pass):
    """Remove export's dtype asserts, eval-mode dropout and dead code; rewrite in-place ops."""

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        graph = gm.graph
        stats = {"asserts_removed": 0, "dropouts_removed": 0, "noop_casts_removed": 0, "inplace_rewritten": 0}
        order = {n: i for i, n in enumerate(graph.nodes)}
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
            elif isinstance(node.target, torch._ops.OpOverload) and node.target._schema.is_mutable:
                functional = _functional(node.target)
                if functional is None:
                    continue
                mutated = node.args[0]
                if mutated.op in ("placeholder", "get_attr"):
                    raise CaptureError(
                        f"op {op_name(node)} at {module_path(node) or 'top level'} writes in place into "
                        f"{'model input' if mutated.op == 'placeholder' else 'parameter/buffer'} "
                        f"{mutated.target}; mpcompiler compiles inference graphs that do not mutate "
                        "their inputs or state"
                    )
                node.target = functional
                later = [u for u in mutated.users if u is not node and order[u] > order[node]]
                for user in later:
                    user.replace_input_with(mutated, node)
                stats["inplace_rewritten"] += 1
        before = len(graph.nodes)
        graph.eliminate_dead_code()
        stats["dead_removed"] = before - len(graph.nodes)
        gm.recompile()
        return PassResult(modified=any(stats.values()), stats=stats)


def _training(node: torch.fx.Node) -> bool:
    train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
    return bool(train)
