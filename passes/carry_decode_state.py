"""carry_decode_state: a decode graph that chooses its next token and writes its next inputs itself.

Runs on a decode graph (``lower_decode_step``'s, one batch size) for ``generate``'s greedy loop
(:meth:`mpcompiler.llm.Generator.decode_step` with ``greedy=True``). Between two replays of the plain decode
graph the loop chose the token (the argmax of the logits), copied four inputs into the graph's buffers and
advanced the positions from Python: ~10 kernels a token outside the graph, 2.7 ms of a 128-token
generation's kernels on the H100 and the gaps between their launches (2026-12-07, docs/llm.md run Z).
Here the graph does it at its end, as gpt-fast's decode loop does in its compiled step:

- the step's inputs become buffers of the module (``decode_input_ids``, ``decode_attention_mask``,
  ``decode_position_ids``, ``decode_cache_position``), so the graph takes no input and a replay copies none;
- the step first marks its own slot (``cache_position``) in the attention mask;
- at its end the token is the argmax of the last position's logits, ``decode_pad_id`` for a row that has
  stopped (a row stops at a token in ``decode_stop_ids``, which -1 pads: no token's id;
  ``decode_done`` holds which rows have), written into ``decode_tokens`` at the next slot and into
  ``input_ids`` for the next replay; ``position_ids`` and ``cache_position`` advance by one (the slot
  clamped to the cache's last: a warm-up run past the cache writes there, not out of bounds).

A generation's replays then run back to back with nothing between them; the loop reads ``decode_tokens``
once at the end. :func:`state` gives the buffers by name.
"""

from __future__ import annotations

import functools

import torch
import torch.fx
import torch.utils._pytree as pytree

from mpcompiler.ir import META_KEY, NodeRecord, Rule
from mpcompiler.pass_manager import Pass, PassResult, retype
from mpcompiler.rewrite import Match, RewriteRule, apply

aten = torch.ops.aten
STEP_INPUTS = ("input_ids", "attention_mask", "position_ids", "cache_position")
STOP_SLOTS = 8  # the eos ids a carrying graph compares each token with (generate loops in Python past that)
PREFIX = "decode_"


def state(step: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The buffers a carrying decode step reads and writes, by name (``input_ids``, ..., ``tokens``, ``done``,
    ``stop_ids``, ``pad_id``): the loop writes them before the first replay and reads ``tokens`` after."""
    return {name[len(PREFIX) :]: b for name, b in step.named_buffers() if name.startswith(PREFIX)}


def _carry(output: torch.fx.Node, logits: int) -> Match | str:
    if output.op != "output":
        return "not the output"
    inputs = {n.target: n for n in output.graph.nodes if n.op == "placeholder"}
    keywords = pytree.tree_unflatten([0] * spec.num_leaves, spec)[1] if (spec := _in_spec(output)) else {}
    missing = [name for name in STEP_INPUTS if name not in inputs or name not in keywords]
    if missing:
        return f"no keyword input {missing[0]}"
    if inputs["input_ids"].meta["val"].shape[1] != 1:
        return "not a decode step (more than one new token a row)"
    return {"logits": pytree.tree_leaves(output.args[0])[logits]} | {n: inputs[n] for n in STEP_INPUTS}


def _write_state(output: torch.fx.Node, m: Match) -> None:
    graph = output.graph
    gm = graph.owning_module
    ids, mask = m["input_ids"], m["attention_mask"]
    rows, slots = (int(s) for s in mask.meta["val"].shape)
    device, mask_dtype = ids.meta["val"].device, mask.meta["val"].dtype

    def call(op, *args, **kwargs):
        node = graph.call_function(op, args, kwargs)
        why = "the decode graph's next token and inputs, written in the graph (greedy)"
        node.meta[META_KEY] = NodeRecord(rule=Rule.DECODE_STATE, reason=why, inserted=True)
        return node

    def buffer(name: str, value: torch.Tensor) -> torch.fx.Node:
        gm.register_buffer(PREFIX + name, value)
        node = graph.get_attr(PREFIX + name)
        node.meta[META_KEY] = NodeRecord(rule=Rule.DECODE_STATE, reason=f"the state a replay leaves the next: {name}")
        return node

    with graph.inserting_before(next(n for n in graph.nodes if n.op != "placeholder")):
        carried = {}
        for name in STEP_INPUTS:
            val = m[name].meta["val"]
            carried[name] = buffer(name, torch.zeros(val.shape, dtype=val.dtype, device=device))
            m[name].replace_all_uses_with(carried[name])
            graph.erase_node(m[name])
        tokens = buffer("tokens", torch.zeros(rows, slots, dtype=torch.long, device=device))
        done = buffer("done", torch.zeros(rows, dtype=torch.bool, device=device))
        stop_ids = buffer("stop_ids", torch.full((STOP_SLOTS,), -1, dtype=torch.long, device=device))
        pad_id = buffer("pad_id", torch.zeros((), dtype=torch.long, device=device))
        mask, slot = carried["attention_mask"], carried["cache_position"]
        seen = call(aten.full.default, [1], 1, dtype=mask_dtype, device=device)
        marked = call(aten.index_put_.default, mask, [None, slot], seen)  # this step's own slot, then its readers
        mask.replace_all_uses_with(marked, delete_user_cb=lambda user: user is not marked)
    with graph.inserting_before(output):
        token = call(aten.argmax.default, call(aten.select.int, m["logits"], 1, -1), -1)
        token = call(aten.where.self, done, pad_id, token)
        stopped = call(aten.logical_or.default, done, call(aten.isin.Tensor_Tensor, token, stop_ids))
        after = call(aten.clamp_max.default, call(aten.add.Tensor, slot, 1), slots - 1)
        column = call(aten.unsqueeze.default, token, 1)
        call(aten.index_put_.default, tokens, [None, after], column)
        call(aten.copy_.default, carried["input_ids"], column)
        call(aten.copy_.default, carried["position_ids"], call(aten.add.Tensor, carried["position_ids"], 1))
        call(aten.copy_.default, slot, after)
        call(aten.copy_.default, done, stopped)
    _drop_inputs(gm, STEP_INPUTS)


def _in_spec(node: torch.fx.Node):
    info = getattr(node.graph._codegen, "pytree_info", None)
    return info.in_spec if info is not None else None


def _drop_inputs(gm: torch.fx.GraphModule, names) -> None:
    """Remove keyword inputs ``names`` from the graph's calling convention (torch.export's pytree codegen)."""
    info = gm.graph._codegen.pytree_info
    args, kwargs = pytree.tree_unflatten(list(range(info.in_spec.num_leaves)), info.in_spec)
    kept = {k: v for k, v in kwargs.items() if k not in names}
    spec = pytree.tree_structure((args, kept))
    gm.graph._codegen.pytree_info = info._replace(in_spec=spec, orig_args=[*info.orig_args[: len(args)], *kept])


class CarryDecodeState(Pass):
    """A decode graph that chooses its next token (greedy, eos rows padded) and writes its own next inputs:
    its inputs become buffers (:func:`state`), so that a generation replays it with nothing in between.
    ``logits``: the logits' index among the step's flat outputs."""

    requires = ("kv_cache",)
    rewrites_graph = True

    def __init__(self, *, logits: int = 0):
        self.rules = [RewriteRule("carried_state", functools.partial(_carry, logits=logits), _write_state,
                                  "the step's inputs -> buffers it writes for the next")]  # fmt: skip

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        reasons: dict = {}
        fired = apply([n for n in gm.graph.nodes if n.op == "output"], self.rules, reasons)
        if fired["carried_state"]:
            retype(gm)
        return PassResult(modified=bool(fired["carried_state"]), stats=dict(fired), reasons=reasons)
