"""place_casts: re-decide the free nodes' dtypes so that the casts cost the fewest bytes.

assign_precision decides in graph order: an elementwise or data-movement node (FOLLOW), and a kernel
that keeps fp32 math inside on low-precision I/O, takes its inputs' dtype. A boundary then sits
wherever a low op's value meets a high op's, which is not always where casting is cheapest: a large
value from an fp32 op flowing through a chain of elementwise ops into fp16 matmuls is cast after the
chain, once per branch, where one cast at its start would do.

Here those *free* nodes are decided together, as an s-t minimum cut:

- Two terminals, LOW (the plan's low dtype) and HIGH (fp32). A node whose dtype a rule fixes (low ops,
  fp32 ops, written dtypes, ``keep_fp32``, the range rule, model inputs) is its terminal. Parameters
  are converted once at compile time and cost nothing, so they are left out.
- A cast's cost is its memory traffic: numel x (bytes read + bytes written), from ``meta["val"]``.
  A symbolic size counts as its hint (the size in the capture sample, through
  its SymInt's ``hint``), one without a hint (data-dependent) as ``_NO_HINT`` elements.
- insert_casts makes one cast per (value, dtype), shared by every reader that needs it, so a value
  with readers on the other side costs one cast, not one per reader. Per value ``p`` with cost ``c``
  and readers ``r``: an auxiliary vertex ``h`` (edges ``p -> h`` of capacity ``c``, ``h -> r``
  unbounded) is cut once when ``p`` is low and some reader high; ``l`` (``r -> l`` unbounded,
  ``l -> p`` of ``c``) once when ``p`` is high and some reader low. The graph output is a reader
  in the model's output dtype, an ``fp32_args`` argument one in fp32.
- A free node may go low only if no rule of assign_precision keeps it out of the low dtype (its range
  and its float inputs' fit, nothing nonzero turns zero); otherwise it is tied to HIGH.
- Ties go low: the cut taken is the one with the smallest high side (the vertices that can still
  reach HIGH in the residual network), since the low dtype moves half the bytes.
- Nodes touching other dtypes (float64 models) keep their plan; only LOW vs HIGH is decided.
- A tuple (split's, chunk's) cannot be cast: it and its readers (getitem) are tied together, and
  the readers of a fixed node's tuple are not free.

Records: a node whose dtype changed, or that no longer has its inputs' dtype, gets rule
``"placement"`` and a reason with the bytes it saves; a free node a rule of assign_precision keeps
out of the low dtype (range, inside, zero, underflow) gets that rule; every other node keeps
assign_precision's rule and reason, which still hold.

:func:`place` is the whole pass as a function, for passes that re-plan (a tolerance search);
:func:`cast_bytes` estimates the bytes a plan casts.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import networkx as nx
import torch
import torch.fx
import torch.utils._pytree as pytree

from mpcompiler import dtypes
from mpcompiler.ir import OpClass, Rule, graph_record, planned_dtype, record
from mpcompiler.ops import positional_names, rule_for
from mpcompiler.pass_manager import Pass, PassResult
from mpcompiler.passes.assign_precision import RANGE_MARGIN, float_inputs, problem, promote

LOW, HIGH = "low", "high"  # the terminals: the low dtype and fp32
_NO_HINT = 1024  # elements assumed for a data-dependent size

Node = torch.fx.Node
# value -> its readers: (reader, None) reads it in the reader's dtype; (None, dtype) in a fixed dtype
Reads = dict[Node, list[tuple[Node | None, torch.dtype | None]]]


class PlaceCasts(Pass):
    """Move free nodes across the precision boundary where that casts fewer bytes."""

    requires = ("plan",)

    def __init__(self, *, margin: float = RANGE_MARGIN):
        self.margin = margin

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        stats = place(gm, margin=self.margin)
        return PassResult(modified=stats["changed"] > 0, stats=stats)


def place(gm: torch.fx.GraphModule, *, margin: float = RANGE_MARGIN) -> dict[str, int]:
    """Re-decide the free nodes of ``gm``'s plan (after assign_precision, before insert_casts).

    Returns the bytes cast before and after (estimated), the free nodes, those moved to another
    dtype, and the records changed.
    """
    g = graph_record(gm)
    if g.casts_inserted:
        raise ValueError("place_casts runs on a plan, before insert_casts")
    low, reads = g.dtype, _reads(gm)
    before = cast_bytes(gm, reads)
    free: dict[Node, None] = {}  # ordered
    for n in gm.graph.nodes:  # in graph order, so a tuple's producer is decided before its readers
        if _is_free(n, low, reads) and all(_castable(a) or a in free for a in _acts(n)):
            free[n] = None  # (a reader of a fixed node's tuple has that node's dtype: not free)
    over = {n: problem(n, low, margin) for n in free}
    high = _min_cut(gm, reads, set(free), low, {n for n, why in over.items() if why})

    old = {n: record(n).dtype for n in free}
    for n in free:
        rec = record(n)
        rec.dtype = torch.float32 if n in high else low
        rec.math_dtype = torch.float32 if rule_for(n).fp32_inside and rec.dtype != torch.float32 else None
    changed = 0
    for n in free:  # reasons once every dtype is final
        rec = record(n)
        if over[n]:
            rule, reason = over[n]
        elif rec.dtype != old[n] or not _follows(n, low):
            rule, reason = Rule.PLACEMENT, _why(n, reads, low)
        else:
            continue
        changed += (rule, reason) != (rec.rule, rec.reason)
        rec.rule, rec.reason = rule, reason
    return {
        "bytes_cast_before": before,
        "bytes_cast_after": cast_bytes(gm, reads),
        "free": len(free),
        "moved": sum(record(n).dtype != old[n] for n in free),
        "changed": changed,
    }


def cast_bytes(gm: torch.fx.GraphModule, reads: Reads | None = None) -> int:
    """Bytes insert_casts will cast at run time under the current plan (read + written, per call)."""
    reads = _reads(gm) if reads is None else reads
    return sum(_cost(v, rs, planned_dtype) for v, rs in reads.items())


def _reads(gm: torch.fx.GraphModule) -> Reads:
    """Every castable value with the readers insert_casts will convert it for (as it does)."""
    reads: Reads = defaultdict(list)

    def note(arg, reader: Node | None, fixed: torch.dtype | None) -> None:
        for v in pytree.tree_leaves(arg):
            if isinstance(v, Node) and _castable(v) and (reader is not None or fixed is not None):
                reads[v].append((reader, fixed))

    for node in gm.graph.nodes:
        if node.op == "output":
            for leaf, dtype in zip(pytree.tree_leaves(node.args[0]), graph_record(gm).output_dtypes, strict=True):
                note(leaf, None, dtype)
        elif (
            node.op == "call_function" and record(node).dtype is not None and record(node).op_class is not OpClass.FIXED
        ):
            fp32_args, names = rule_for(node).fp32_args, positional_names(node)
            args = [(names[i] if i < len(names) else None, a) for i, a in enumerate(node.args)]
            for name, a in args + list(node.kwargs.items()):
                if name in fp32_args:
                    note(a, None, torch.float32)
                else:
                    note(a, node, None)
    return reads


def _castable(v: Node) -> bool:
    """A float tensor produced at run time (parameters are converted at compile time)."""
    val = v.meta.get("val")
    return v.op != "get_attr" and isinstance(val, torch.Tensor) and val.dtype.is_floating_point


def _cost(value: Node, readers, dtype_of: Callable[[Node], torch.dtype | None]) -> int:
    """Bytes cast for ``value``: one cast per dtype its readers need other than its own."""
    have = dtype_of(value)
    wants = {fixed or dtype_of(reader) for reader, fixed in readers} - {have, None}
    return sum(_traffic(value, have, want) for want in wants)


def _traffic(value: Node, src: torch.dtype, dst: torch.dtype) -> int:
    numel = value.meta["val"].numel()
    if isinstance(numel, torch.SymInt):  # its size in the capture sample; none if data-dependent
        numel = _NO_HINT if numel.node.hint is None else int(numel.node.hint)
    return numel * (src.itemsize + dst.itemsize)


def _is_free(node: Node, low: torch.dtype, reads: Reads) -> bool:
    """Follows its inputs by assign_precision's rules, has float inputs, and touches only LOW/HIGH."""
    rec = record(node)
    if node.op != "call_function" or rec.rule not in (Rule.FOLLOWS_INPUTS, Rule.OP_CLASS, Rule.PLACEMENT):
        return False
    if rec.op_class is not OpClass.FOLLOW and not (rec.op_class is OpClass.FP32 and rule_for(node).fp32_inside):
        return False
    inputs = float_inputs(node)
    if not inputs:  # creates its value: the dtype it computes in is as captured
        return False
    touched = {rec.dtype} | {planned_dtype(a) for a in _acts(node)}
    touched |= {fixed or record(r).dtype for r, fixed in reads.get(node, [])}
    return touched <= {low, torch.float32}


def _acts(node: Node) -> list[Node]:
    """Float inputs computed at run time (parameters left out)."""
    return [a for a in float_inputs(node) if a.op != "get_attr"]


def _min_cut(gm, reads: Reads, free: set[Node], low: torch.dtype, forced_high: set[Node]) -> set[Node]:
    """The free nodes on the HIGH side of a minimum cut (the smallest such side)."""
    terminal = {low: LOW, torch.float32: HIGH}

    def vertex(n: Node):
        return n if n in free else terminal.get(planned_dtype(n))

    net = nx.DiGraph()
    net.add_nodes_from([LOW, HIGH, *free])

    def edge(u, v, capacity: int | None = None) -> None:  # no capacity: unbounded
        if u is None or v is None or u == v:
            return
        if capacity is None:
            net.add_edge(u, v)
            net[u][v].pop("capacity", None)
        elif not net.has_edge(u, v):
            net.add_edge(u, v, capacity=capacity)
        elif "capacity" in net[u][v]:
            net[u][v]["capacity"] += capacity

    for value, readers in reads.items():
        p = vertex(value)
        rs = {vertex(r) if fixed is None else terminal.get(fixed) for r, fixed in readers} - {p, None}
        if p is None or not rs or (p not in free and not rs & free):
            continue  # no reader or producer to decide: a constant cost
        c = _traffic(value, low, torch.float32)  # the same both ways
        if len(rs) == 1:
            (r,) = rs
            edge(p, r, c)
            edge(r, p, c)
            continue
        h, lo = ("to high", value), ("to low", value)
        edge(p, h, c)
        edge(lo, p, c)
        for r in rs:
            edge(h, r)
            edge(r, lo)
    for n in gm.graph.nodes:  # a tuple cannot be cast: its readers (getitem) take its dtype
        if n.op != "get_attr" and not isinstance(n.meta.get("val"), torch.Tensor) and vertex(n) is not None:
            for r in n.users:
                if record(r).dtype is not None and record(r).op_class is not OpClass.FIXED:
                    edge(vertex(n), vertex(r))
                    edge(vertex(r), vertex(n))
    for n in forced_high:
        edge(n, HIGH)

    residual = nx.flow.preflow_push(net, LOW, HIGH)
    high, todo = {HIGH}, [HIGH]
    while todo:  # walk back from HIGH along edges with capacity left
        v = todo.pop()
        for u in residual.predecessors(v):
            e = residual[u][v]
            if u not in high and e["flow"] < e["capacity"]:
                high.add(u)
                todo.append(u)
    return high & free


def _follows(node: Node, low: torch.dtype) -> bool:
    """The node has the dtype assign_precision's follow rule would give it under the current plan."""
    acts = _acts(node)
    return record(node).dtype == (promote([planned_dtype(a) for a in acts]) if acts else low)


def _why(node: Node, reads: Reads, low: torch.dtype) -> str:
    """The bytes this node's dtype saves over the other one, the rest of the plan as it is."""
    here = record(node).dtype
    there = torch.float32 if here == low else low
    tuples = [a for a in _acts(node) if not _castable(a)]
    if tuples:
        return f"reads %{tuples[0].name}, a tuple, which cannot be cast: takes its dtype"
    values = [node, *[a for a in node.all_input_nodes if a in reads]]

    def local(dtype_of) -> int:
        return sum(_cost(v, reads.get(v, []), dtype_of) for v in values)

    saved = local(lambda n: there if n is node else planned_dtype(n)) - local(planned_dtype)
    if saved <= 0:
        return f"cast placement: {dtypes.short(there)} would cast as many bytes; ties go to {dtypes.short(low)}"
    return f"cast placement: {_fmt_bytes(saved)} fewer bytes cast than in {dtypes.short(there)}"


def _fmt_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


__all__ = ["PlaceCasts", "cast_bytes", "place"]
