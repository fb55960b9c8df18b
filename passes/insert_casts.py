"""insert_casts: realise the precision plan.

- Where a consumer runs in another dtype than a value it reads, insert one cast of that value (shared
  by every consumer that needs the same dtype), right after the value is produced.
- Parameters and buffers are converted once, here, at compile time: the attribute itself is replaced
  by its converted tensor (or, if consumers need two dtypes, a converted copy is added beside it).
- Graph outputs are cast back to the model's own output dtypes.
- Nodes whose dtype the program writes (a user's ``x.float()``) take their input as it comes.

Afterwards the graph is re-typed through fake tensors, and every node's dtype equals its plan.
"""

from __future__ import annotations

import torch
import torch.fx
import torch.utils._pytree as pytree

from mpcompiler import dtypes
from mpcompiler.ir import (
    META_KEY,
    NodeRecord,
    OpClass,
    Rule,
    attr_of,
    float_dtype,
    graph_record,
    planned_dtype,
    record,
)
from mpcompiler.ops import convert_inputs
from mpcompiler.pass_manager import Pass, PassResult

CAST = torch.ops.aten._to_copy.default


class InsertCasts(Pass):
    """Insert casts at precision boundaries and convert parameters once."""

    requires = ("plan",)
    ensures = ("casts",)
    rewrites_graph = True

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        rewrite = _Rewrite(gm)
        for node in list(gm.graph.nodes):
            if node.op == "output":
                rewrite.outputs(node, graph_record(gm).output_dtypes)
            elif (
                node.op == "call_function"
                and record(node).dtype is not None
                and record(node).op_class is not OpClass.FIXED
            ):
                rewrite.inputs(node)
            elif node.op in ("call_function", "call_module"):
                rewrite.note_param_reads(node)
        converted = rewrite.convert_params()
        graph_record(gm).casts_inserted = True
        stats = {"casts_inserted": len(rewrite.casts), "params_converted": converted}
        return PassResult(modified=any(stats.values()), stats=stats)


class _Rewrite:
    """The state of one insert_casts run over one graph."""

    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm
        self.casts: dict[tuple[torch.fx.Node, torch.dtype, bool], torch.fx.Node] = {}
        # parameter target -> (get_attr node, consumer, dtype the consumer reads it in)
        self.param_reads: dict[str, list[tuple[torch.fx.Node, torch.fx.Node, torch.dtype]]] = {}
        self.last_input = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]

    def inputs(self, node: torch.fx.Node) -> None:
        """Make each float input of ``node`` arrive in the node's dtype (fp32 for ``fp32_args``)."""
        node.args, node.kwargs = convert_inputs(
            node, node.args, node.kwargs, record(node).dtype, lambda a, want, sat: self._map(a, node, want, sat)
        )

    def outputs(self, node: torch.fx.Node, wanted: tuple[torch.dtype | None, ...]) -> None:
        """Cast the graph's outputs back to the model's dtypes (leaves in pytree order)."""
        leaves, spec = pytree.tree_flatten(node.args[0])
        leaves = [
            self._value(v, d, node) if isinstance(v, torch.fx.Node) else v for v, d in zip(leaves, wanted, strict=True)
        ]
        node.args = (pytree.tree_unflatten(leaves, spec),)

    def note_param_reads(self, node: torch.fx.Node) -> None:
        """Nodes outside the plan read parameters in their own dtype."""
        for a in node.all_input_nodes:
            if a.op == "get_attr" and float_dtype(a.meta.get("val")) is not None:
                self.param_reads.setdefault(a.target, []).append((a, node, float_dtype(a.meta["val"])))

    def _map(self, arg, consumer: torch.fx.Node, want: torch.dtype, saturate: bool = False):
        return torch.fx.node.map_arg(arg, lambda a: self._value(a, want, consumer, saturate))

    def _value(
        self, value: torch.fx.Node, want: torch.dtype | None, consumer: torch.fx.Node, saturate: bool = False
    ) -> torch.fx.Node:
        """``value`` as ``consumer`` needs it: itself, or a cast of it to ``want`` (clamped first to
        ``want``'s range when ``saturate`` and the value reaches past it)."""
        val = value.meta.get("val")
        if want is None or not isinstance(val, torch.Tensor) or not val.dtype.is_floating_point:
            return value
        if value.op == "get_attr":
            self.param_reads.setdefault(value.target, []).append((value, consumer, want))
            return value
        have = planned_dtype(value)
        if have == want:
            return value
        r = record(value).range
        saturate = saturate and r is not None and r.absmax > torch.finfo(want).max
        if (value, want, saturate) not in self.casts:
            graph = value.graph
            # a model input's casts go after the last input: the graph's inputs stay together at its top
            where = self.last_input if value.op == "placeholder" else value
            source = value
            with graph.inserting_after(where):
                if saturate:
                    limit = float(torch.finfo(want).max)
                    r = r.clamped(limit)  # the clamp's and the cast's values: what the low dtype holds
                    source = graph.call_function(torch.ops.aten.clamp.default, (value, -limit, limit))
                    source.meta["val"] = val
                    source.meta[META_KEY] = NodeRecord(
                        module_path=record(consumer).module_path,
                        op_class=OpClass.FOLLOW,
                        dtype=have,
                        rule=Rule.CLAMP,
                        reason=f"clamps %{value.name} to {dtypes.short(want)}'s range: "
                        "beyond it, all values mask alike",
                        range=r,
                        inserted=True,
                    )
            with graph.inserting_after(source if saturate else where):
                name = f"{value.name}_{dtypes.short(want)}"
                cast = graph.create_node("call_function", CAST, (source,), {"dtype": want}, name=name)
            cast.meta["val"] = val
            cast.meta[META_KEY] = NodeRecord(
                module_path=record(consumer).module_path if consumer.op != "output" else "",
                op_class=OpClass.FIXED,
                dtype=want,
                rule=Rule.CAST,
                reason=f"%{value.name} is {dtypes.short(have)}; %{consumer.name} reads it as {dtypes.short(want)}",
                range=r,
                inserted=True,
            )
            self.casts[value, want, saturate] = cast
        return self.casts[value, want, saturate]

    def convert_params(self) -> int:
        """Replace each parameter by its converted tensor; add converted copies where dtypes differ."""
        gm, converted = self.gm, 0
        for target, reads in self.param_reads.items():
            original = attr_of(gm, target)
            wanted = {want for _, _, want in reads}
            in_place = len(wanted) == 1  # one dtype read: replace the attribute itself
            for dtype in sorted(wanted - {original.dtype}, key=str):
                converted += 1
                name = target if in_place else f"{target}_{dtypes.short(dtype)}"
                _set_attr(gm, name, original.detach().to(dtype), like=target)
                copy = None
                for node, consumer, want in reads:
                    if want != dtype:
                        continue
                    if in_place:
                        record(node).dtype = dtype
                        continue
                    if copy is None:
                        with gm.graph.inserting_after(node):
                            copy = gm.graph.get_attr(name)
                        copy.meta["val"] = node.meta["val"]
                        copy.meta[META_KEY] = NodeRecord(
                            dtype=dtype,
                            rule=Rule.PARAMETER,
                            reason=f"{target} converted once",
                            range=record(node).range,
                        )
                    consumer.replace_input_with(node, copy)
        return converted


def _set_attr(gm: torch.nn.Module, target: str, tensor: torch.Tensor, *, like: str) -> None:
    """Set ``target`` to ``tensor`` as the same kind of attribute (parameter, buffer, plain) as ``like``."""
    like_owner_path, _, like_name = like.rpartition(".")
    like_owner = gm.get_submodule(like_owner_path)
    owner_path, _, name = target.rpartition(".")
    owner = gm.get_submodule(owner_path)
    if like_name in like_owner._parameters:
        owner.register_parameter(name, torch.nn.Parameter(tensor, requires_grad=False))
    elif like_name in like_owner._buffers:
        owner.register_buffer(name, tensor)
    else:
        setattr(owner, name, tensor)
