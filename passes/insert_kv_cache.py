"""insert_kv_cache: give a causal LM's planned graph a static KV cache, for generation.

The pipeline plans the model on whole sequences (``input_ids``, ``attention_mask``, ``position_ids``,
the logits of every position): calibration, the precision plan and the tolerance search see prompts and
their continuations as one sequence, which computes exactly what prefill and decode steps compute. This
pass then rewrites a copy of the planned graph into the generation program, as gpt-fast and
TensorRT-LLM's AutoDeploy do, without going through a model library's cache classes:

- a new input ``cache_position`` [T]: the cache slots the T new tokens are written to (0..T-1 for a
  prefill, one slot per decode step); ``attention_mask`` now covers every slot, [B, max_seq] (1 for a
  token that is there: the prompt's, left padding excluded, and those written since);
- per attention (``scaled_dot_product_attention``), a key and a value buffer [max_batch, heads, max_seq,
  head_dim] in the dtype the plan gives the keys and values. The new keys and values are written in place
  (``index_put_``) at ``cache_position`` (before any repetition for grouped-query attention, which
  SDPA's ``enable_gqa`` does instead), and the attention reads the whole cache (a call with fewer rows
  than ``max_batch`` uses the first rows);
- one mask for all layers, [B, 1, T, max_seq]: a slot is seen if it holds a token and is not after the
  query (``slot <= cache_position``); a query always sees its own slot, so that a left-padding query
  has a row to attend to (no NaN to spread through the cache).

The model must take ``position_ids`` (rotary and learned positions then come from that input) and use
``attention_mask`` only to mask attention; the pass says so otherwise.
"""

from __future__ import annotations

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch._guards import detect_fake_mode
from torch.fx.experimental.symbolic_shapes import statically_known_true

from mpcompiler.errors import CaptureError
from mpcompiler.ir import META_KEY, NodeRecord, op_name, record
from mpcompiler.pass_manager import Pass, PassResult, retype

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
INPUTS = ("input_ids", "attention_mask", "position_ids")
# What sits between the keys (values) a layer computes and its attention: grouped-query repetition.
_REPEAT = frozenset("reshape view _unsafe_view expand unsqueeze slice clone contiguous alias".split())


class InsertKvCache(Pass):
    """Rewrite a causal LM's planned graph into one prefill/decode step with a static KV cache."""

    def __init__(self, *, max_batch: int, max_seq: int):
        self.max_batch, self.max_seq = max_batch, max_seq

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        graph = gm.graph
        inputs = {n.target: n for n in graph.nodes if n.op == "placeholder"}
        missing = [name for name in INPUTS if name not in inputs]
        if missing:
            raise CaptureError(f"generation needs a model that takes {', '.join(INPUTS)}; it has no {missing}")
        attentions = [n for n in graph.nodes if n.target is SDPA]
        if not attentions:
            raise CaptureError(
                "no scaled_dot_product_attention in the graph: mpcompiler's KV cache attaches to attention "
                "written as SDPA or as eager softmax(q @ k^T) @ v"
            )
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        batch, length = ids.meta["val"].shape
        device = ids.meta["val"].device
        for size in [n for n in mask.users if n.target is aten.sym_size.int]:
            size.args = (ids, *size.args[1:])  # export may read the sequence length off the mask: same shape
        old_readers = set(mask.users)

        with detect_fake_mode([ids.meta["val"]]):  # new inputs' sizes are the export's symbols
            position = torch.empty((length,), dtype=torch.int64, device=device)
            slot_mask = torch.empty((batch, self.max_seq), dtype=mask.meta["val"].dtype, device=device)
        last = [n for n in graph.nodes if n.op == "placeholder"][-1]
        with graph.inserting_after(last):
            cache_position = graph.placeholder("cache_position")
        cache_position.meta["val"], mask.meta["val"] = position, slot_mask
        record(cache_position).rule = "model input"

        with graph.inserting_before(attentions[0]):
            visible = self._mask(graph, mask, cache_position, device)
            rows = graph.call_function(aten.sym_size.int, (ids, 0))  # the batch: the cache's first rows
            rows.meta[META_KEY] = NodeRecord(rule="kv cache", reason="the batch size")
        for i, attention in enumerate(attentions):
            q, k, v = attention.args[:3]
            k, v = _source(k, q), _source(v, q)
            grouped = _heads(k) != _heads(q)
            keys, values = (
                self._write(gm, attention, i, kind, x, cache_position, rows) for kind, x in (("key", k), ("value", v))
            )
            attention.args = (q, keys, values, visible)
            attention.kwargs = {"scale": attention.kwargs.get("scale")} | ({"enable_gqa": True} if grouped else {})
        for guard in [n for n in graph.nodes if n.op == "call_module" and n.target == "_guards_fn"]:
            graph.erase_node(guard)  # torch.export's checks of the inputs as captured: attention_mask changed
        graph.eliminate_dead_code()
        stray = [n.format_node() for n in mask.users if n in old_readers]
        if stray:
            raise CaptureError(
                f"the model reads attention_mask outside its attention masks ({', '.join(stray[:3])}): with a KV "
                "cache it covers every cache slot, which such a model would misread"
            )
        _add_input(gm, "cache_position")
        gm.recompile()
        retype(gm)
        return PassResult(modified=True, stats={"attentions": len(attentions), "cache_slots": self.max_seq})

    def _mask(self, graph, mask, cache_position, device) -> torch.fx.Node:
        """[B, 1, T, max_seq] bool: slot s is seen by query t if it holds a token and s <= position[t],
        or if it is t's own slot."""

        def call(op, *args, **kwargs):
            node = graph.call_function(op, args, kwargs)
            node.meta[META_KEY] = NodeRecord(rule="kv cache", reason="which cache slots each new token sees")
            return node

        slots = call(aten.arange.default, self.max_seq, dtype=torch.int64, device=device)
        slots = call(aten.unsqueeze.default, slots, 0)  # [1, S]
        position = call(aten.unsqueeze.default, cache_position, 1)  # [T, 1]
        causal = call(aten.le.Tensor, slots, position)  # [T, S]
        own = call(aten.eq.Tensor, slots, position)
        filled = call(aten.ne.Scalar, mask, 0)  # [B, S]
        filled = call(aten.unsqueeze.default, call(aten.unsqueeze.default, filled, 1), 1)  # [B, 1, 1, S]
        return call(aten.logical_or.default, call(aten.logical_and.default, filled, causal), own)

    def _write(self, gm, attention, layer: int, kind: str, new, cache_position, batch) -> torch.fx.Node:
        """The cache of ``kind`` for attention ``layer``, with ``new`` written at cache_position."""
        val = new.meta["val"]
        name = f"kv_cache_{layer}_{kind}"
        shape = (self.max_batch, int(val.shape[1]), self.max_seq, int(val.shape[3]))
        gm.register_buffer(name, torch.zeros(shape, dtype=val.dtype, device=val.device))
        graph = gm.graph
        how = NodeRecord(
            module_path=record(attention).module_path,
            dtype=val.dtype,
            rule="kv cache",
            reason=f"{kind}s of this attention, {str(val.dtype).removeprefix('torch.')} as the plan computes them",
        )
        with graph.inserting_before(attention):
            buffer = graph.get_attr(name)
            rows = graph.call_function(aten.slice.Tensor, (buffer, 0, 0, batch))
            # cache[:, :, cache_position] = new, as gpt-fast writes it (Inductor updates it in place)
            written = graph.call_function(aten.index_put_.default, (rows, [None, None, cache_position], new))
        for node in (buffer, rows, written):
            node.meta[META_KEY] = NodeRecord(**{**how.__dict__})
        return written


def _heads(node: torch.fx.Node) -> int:
    return int(node.meta["val"].shape[1])


def _source(x: torch.fx.Node, q: torch.fx.Node) -> torch.fx.Node:
    """The keys (or values) as the layer computes them, [B, heads, T, head_dim], before any grouped-query
    repetition: the deepest such node on the chain of data movement that feeds the attention."""
    batch, length, dim = q.meta["val"].shape[0], q.meta["val"].shape[2], x.meta["val"].shape[3]
    best, node = None, x
    while isinstance(node, torch.fx.Node):
        val = node.meta.get("val")
        if (
            isinstance(val, torch.Tensor)
            and val.dim() == 4
            and statically_known_true(val.shape[0] == batch)
            and statically_known_true(val.shape[2] == length)
            and val.shape[3] == dim
            and int(q.meta["val"].shape[1]) % int(val.shape[1]) == 0
        ):
            best = node
        if node.op != "call_function" or op_name(node) not in _REPEAT:
            break
        node = node.args[0]
    if best is None:
        raise CaptureError(f"attention %{x.name}: no [batch, heads, seq, head_dim] keys/values to cache")
    return best


def _add_input(gm: torch.fx.GraphModule, name: str) -> None:
    """Append keyword input ``name`` to the graph's calling convention (torch.export's pytree codegen)."""
    info = gm.graph._codegen.pytree_info
    args, kwargs = pytree.tree_unflatten(list(range(info.in_spec.num_leaves)), info.in_spec)
    spec = pytree.tree_structure((args, {**kwargs, name: 0}))
    gm.graph._codegen.pytree_info = info._replace(in_spec=spec, orig_args=[*info.orig_args, name])
