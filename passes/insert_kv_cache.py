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
  (``index_put_``) at ``cache_position`` (before any repetition for grouped-query attention: each key
  and value head's queries attend as one group instead), and the attention reads the whole cache (a call
  with fewer rows than ``max_batch`` uses the first rows);
- one mask for all layers, [B, 1, T, max_seq]: a slot is seen if it holds a token and is not after the
  query (``slot <= cache_position``); a query always sees its own slot, so that a left-padding query
  has a row to attend to (no NaN to spread through the cache).

``cache="io"`` (the ONNX artifact) writes the step with the cache as inputs and outputs instead, in
ONNX Runtime GenAI's convention (docs/onnx.md): ``past_key_values.{i}.key``/``.value`` [B, heads, P,
head_dim] in, ``present.{i}.key``/``.value`` [B, heads, P + T, head_dim] out, and ``attention_mask``
[B, P + T] marking each row's tokens. The cache is laid out as ONNX Runtime's GroupQueryAttention lays
it out (``mpcompiler.fused.kv_attention``): each row's tokens packed at the front, so prompts are
right-padded, and each attention becomes one ``kv_attention`` call, which ``lower_fused`` writes as
GroupQueryAttention where the target has the kernel.

The model must take ``position_ids`` (rotary and learned positions then come from that input) and use
``attention_mask`` only to mask attention; the pass says so otherwise.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch._dynamo.source import ConstantSource
from torch._guards import detect_fake_mode
from torch.fx.experimental.symbolic_shapes import DimDynamic, statically_known_true

from mpcompiler.errors import CaptureError
from mpcompiler.fused import kv_attention
from mpcompiler.ir import META_KEY, NodeRecord, Rule, derived, graph_record, op_name, record
from mpcompiler.pass_manager import Pass, PassResult

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
INPUTS = ("input_ids", "attention_mask", "position_ids")
# What sits between the keys (values) a layer computes and its attention: grouped-query repetition.
_REPEAT = frozenset("reshape view _unsafe_view expand unsqueeze slice clone contiguous alias".split())


class InsertKvCache(Pass):
    """Rewrite a causal LM's planned graph into one prefill/decode step with a KV cache: in buffers of the
    module (``cache="buffers"``, static, for FX and CUDA graphs) or as inputs and outputs (``cache="io"``,
    the ``past_key_values.{i}.key``/``present.{i}.key`` convention of ONNX Runtime GenAI)."""

    requires = ("casts",)  # it rewrites the emitted module
    rewrites_graph = True

    def __init__(self, *, max_batch: int, max_seq: int, cache: str = "buffers"):
        if cache not in ("buffers", "io"):
            raise ValueError(f"cache={cache!r}: 'buffers' or 'io'")
        self.max_batch, self.max_seq, self.cache = max_batch, max_seq, cache
        self.ensures = ("kv_cache",) if cache == "buffers" else ()  # "io": the cache is the step's inputs

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
        for size in [n for n in mask.users if n.target is aten.sym_size.int]:
            size.args = (ids, *size.args[1:])  # export may read the sequence length off the mask: same shape
        old_readers = set(mask.users)
        sources = [(_source(a.args[1], a.args[0]), _source(a.args[2], a.args[0])) for a in attentions]
        step = _Buffers(self, gm, ids, mask) if self.cache == "buffers" else _Io(gm, ids, mask, sources)
        with graph.inserting_before(attentions[0]):
            visible = step.visible()
        for i, (attention, (k, v)) in enumerate(zip(attentions, sources, strict=True)):
            with graph.inserting_before(attention):
                step.attend(attention, i, k, v, visible)
        for guard in [n for n in graph.nodes if n.op == "call_module" and n.target == "_guards_fn"]:
            graph.erase_node(guard)  # torch.export's checks of the inputs as captured: attention_mask changed
        step.finish()
        graph.eliminate_dead_code()
        stray = [n.format_node() for n in mask.users if n in old_readers]
        if stray:
            raise CaptureError(
                f"the model reads attention_mask outside its attention masks ({', '.join(stray[:3])}): with a KV "
                "cache it covers every cache slot, which such a model would misread"
            )
        gm.meta[META_KEY] = dataclasses.replace(graph_record(gm), cache_slots=self.max_seq)  # its own: a copy's
        return PassResult(modified=True, stats={"attentions": len(attentions), "cache_slots": self.max_seq})


def _call(graph, op, *args, **kwargs) -> torch.fx.Node:
    node = graph.call_function(op, args, kwargs)
    node.meta[META_KEY] = NodeRecord(rule=Rule.KV_CACHE, reason="which cache slots each new token sees")
    return node


def _visible(graph, mask, slots, positions) -> torch.fx.Node:
    """[B, 1, T, S] bool: slot s is seen by query t if it holds a token (``mask`` [B, S]) and is not after
    the query (s <= positions[t]), or if it is t's own slot. ``slots`` is S (an int or a size node)."""
    device = mask.meta["val"].device
    slots = _call(
        graph, aten.unsqueeze.default, _call(graph, aten.arange.default, slots, dtype=torch.int64, device=device), 0
    )
    positions = _call(graph, aten.unsqueeze.default, positions, 1)  # [T, 1]
    causal = _call(graph, aten.le.Tensor, slots, positions)  # [T, S]
    own = _call(graph, aten.eq.Tensor, slots, positions)
    filled = _call(graph, aten.ne.Scalar, mask, 0)  # [B, S]
    filled = _call(graph, aten.unsqueeze.default, _call(graph, aten.unsqueeze.default, filled, 1), 1)  # [B, 1, 1, S]
    return _call(graph, aten.logical_or.default, _call(graph, aten.logical_and.default, filled, causal), own)


class _Buffers:
    """The static cache: buffers [max_batch, heads, max_seq, head_dim], written in place at the new input
    ``cache_position``; ``attention_mask`` covers every slot."""

    def __init__(self, options: InsertKvCache, gm, ids, mask):
        self.options, self.gm, self.ids, self.attention_mask = options, gm, ids, mask
        self.grouped = None  # the mask as grouped-query attention reads it
        batch, length = ids.meta["val"].shape
        device = ids.meta["val"].device
        graph = gm.graph
        with detect_fake_mode([ids.meta["val"]]):  # new inputs' sizes are the export's symbols
            position = torch.empty((length,), dtype=torch.int64, device=device)
            slot_mask = torch.empty((batch, options.max_seq), dtype=mask.meta["val"].dtype, device=device)
        with graph.inserting_after([n for n in graph.nodes if n.op == "placeholder"][-1]):
            self.position = graph.placeholder("cache_position")
        self.position.meta["val"], mask.meta["val"] = position, slot_mask
        record(self.position).rule = Rule.MODEL_INPUT

    def visible(self) -> torch.fx.Node:
        graph = self.gm.graph
        self.rows = _call(graph, aten.sym_size.int, self.ids, 0)  # the batch: the cache's first rows
        return _visible(graph, self.attention_mask, self.options.max_seq, self.position)

    def attend(self, attention, layer: int, k, v, visible) -> None:
        """The attention reads the whole cache, ``k`` and ``v`` written into it. With grouped-query
        attention each key/value head's queries attend as one group: q [B, heads, T, d] is read as
        [B, kv_heads, group x T, d] (the mask repeated per group), so SDPA runs its fused kernel with a
        mask and no key/value head is repeated. SDPA's ``enable_gqa`` with a mask has no fused kernel but
        cuDNN's: without cuDNN it ran as fp32 math over a repeated cache, 2x slower a decode step on the
        H200 (2026-12-02)."""
        graph, q = self.gm.graph, attention.args[0]
        keys, values = self._write(attention, layer, "key", k), self._write(attention, layer, "value", v)
        scale = {"scale": attention.kwargs.get("scale")}
        heads, kv_heads, dim = _heads(q), _heads(k), int(q.meta["val"].shape[3])
        if heads == kv_heads:
            attention.args, attention.kwargs = (q, keys, values, visible), scale
            return
        if self.grouped is None:  # one mask for every layer (written before the first): [B, 1, group x T, S]
            wide = _call(graph, aten.expand.default, _call(graph, aten.unsqueeze.default, visible, 2),
                         [-1, -1, heads // kv_heads, -1, -1])  # fmt: skip
            self.grouped = _call(graph, aten.reshape.default, wide, [self.rows, 1, -1, self.options.max_seq])
        queries = _call(graph, aten.reshape.default, q, [self.rows, kv_heads, -1, dim])
        attention.args, attention.kwargs = (queries, keys, values, self.grouped), scale
        with graph.inserting_after(attention):
            out = _call(graph, aten.reshape.default, attention, [self.rows, heads, -1, dim])
        attention.replace_all_uses_with(out, delete_user_cb=lambda user: user is not out)

    def _write(self, attention, layer: int, kind: str, new) -> torch.fx.Node:
        """The cache of ``kind`` for attention ``layer``, with ``new`` written at cache_position."""
        gm, graph, val = self.gm, self.gm.graph, new.meta["val"]
        name = f"kv_cache_{layer}_{kind}"
        shape = (self.options.max_batch, int(val.shape[1]), self.options.max_seq, int(val.shape[3]))
        gm.register_buffer(name, torch.zeros(shape, dtype=val.dtype, device=val.device))
        buffer = graph.get_attr(name)
        rows = graph.call_function(aten.slice.Tensor, (buffer, 0, 0, self.rows))
        # cache[:, :, cache_position] = new, as gpt-fast writes it (Inductor updates it in place)
        written = graph.call_function(aten.index_put_.default, (rows, [None, None, self.position], new))
        for node in (buffer, rows, written):
            node.meta[META_KEY] = _record(attention, kind, val.dtype)
        return written

    def finish(self) -> None:
        _add_input(self.gm, "cache_position")


class _Io:
    """The cache as inputs and outputs: ``past_key_values_{i}_key`` [B, heads, P, head_dim] in, the presents
    [B, heads, P + T, head_dim] out (``present.{i}.key``), each attention a :func:`kv_attention` call."""

    def __init__(self, gm, ids, mask, sources):
        self.gm, self.ids, self.attention_mask = gm, ids, mask
        graph, val = gm.graph, ids.meta["val"]
        mode = detect_fake_mode([val])
        past = mode.shape_env.create_unspecified_symint_and_symbol(
            4, ConstantSource("past_sequence_length"), DimDynamic.DYNAMIC
        )
        self.past, self.presents = [], {}
        last = [n for n in graph.nodes if n.op == "placeholder"][-1]
        for layer, pair in enumerate(sources):
            for kind, x in zip(("key", "value"), pair, strict=True):
                with graph.inserting_after(last):
                    last = graph.placeholder(f"past_key_values_{layer}_{kind}")
                heads, dim = int(x.meta["val"].shape[1]), int(x.meta["val"].shape[3])
                with mode:
                    last.meta["val"] = torch.empty(
                        (val.shape[0], heads, past, dim), dtype=x.meta["val"].dtype, device=val.device
                    )
                last.meta[META_KEY] = NodeRecord(
                    dtype=x.meta["val"].dtype, rule=Rule.MODEL_INPUT, reason=f"past {kind}s of attention {layer}"
                )
                self.past.append(last)
        with mode:
            mask.meta["val"] = torch.empty(
                (val.shape[0], past + val.shape[1]), dtype=mask.meta["val"].dtype, device=val.device
            )

    def visible(self) -> None:
        return None  # kv_attention reads each row's length off attention_mask

    def attend(self, attention, layer: int, k, v, visible) -> None:
        """The attention becomes one kv_attention call; its presents are outputs."""
        graph = self.gm.graph
        past_key, past_value = self.past[2 * layer : 2 * layer + 2]
        args = (attention.args[0], k, v, past_key, past_value, self.attention_mask)
        node = graph.call_function(kv_attention, args, {"scale": attention.kwargs.get("scale")})
        node.meta[META_KEY] = derived(record(attention))
        out, *presents = [graph.call_function(operator.getitem, (node, i)) for i in range(3)]
        out.meta[META_KEY] = dataclasses.replace(record(attention))
        for kind, present in zip(("key", "value"), presents, strict=True):
            present.meta[META_KEY] = _record(attention, kind, k.meta["val"].dtype)
            self.presents[f"present.{layer}.{kind}"] = present
        attention.replace_all_uses_with(out)
        graph.erase_node(attention)  # dead code elimination keeps SDPA (its dropout makes it "impure")

    def finish(self) -> None:
        for node in self.past:
            _add_input(self.gm, node.target)
        output = next(n for n in self.gm.graph.nodes if n.op == "output")
        info = self.gm.graph._codegen.pytree_info
        logits = pytree.tree_leaves(output.args[0])[0]
        outputs = {"logits": logits, **self.presents}
        output.args = (tuple(outputs.values()),)
        spec = pytree.tree_structure(dict.fromkeys(outputs, 0))
        self.gm.graph._codegen.pytree_info = info._replace(out_spec=spec)


def _record(attention, kind: str, dtype) -> NodeRecord:
    return NodeRecord(
        module_path=record(attention).module_path,
        dtype=dtype,
        rule=Rule.KV_CACHE,
        reason=f"{kind}s of this attention, {str(dtype).removeprefix('torch.')} as the plan computes them",
    )


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
