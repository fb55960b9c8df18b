"""lower_fused: rewrite op patterns into fused ops the target runs as one kernel.

Runs with the target it lowers for (each rule writes the fused op of its name: ``mpcompiler.fused.FUSED_OPS``):

- in the pipeline, before precision work, for the FX artifact (``fx-cuda``/``fx-cpu``): eager
  attention -> scaled_dot_product_attention, a GELU written as a formula -> ``aten.gelu``; fragile
  math (softmax, tanh/erf chains) is then one kernel that keeps fp32 inside, with no cast islands;
- on a copy of the planned graph, where the table says the target has the kernel for the node's
  dtype: in export_onnx for ONNX Runtime (``ort-cuda``/``ort-cpu``): residual add + layer_norm ->
  SkipLayerNormalization, linear bias + GELU -> BiasGelu/FastGelu, self-attention from q/k/v linears
  of one input -> Attention (one packed projection); in compiled.cuda_graph() for
  ``fx-cuda``: fp16/bf16 conv2d + bias [+ residual] + relu -> one cuDNN convolution. For ONNX
  Runtime too: a linear of a permuted input (``nn.MultiheadAttention``'s batch_first transpose) is
  written as the permute of the linear's output, the same numbers (mpcompiler.fused says why); a
  causal LM's attention over its past -> GroupQueryAttention, RMSNorm -> SimplifiedLayerNormalization
  (with the residual add before it: SkipSimplifiedLayerNormalization).

Each rule is a match, which returns the captured nodes or the reason it does not apply, and a rewrite
(mpcompiler.rewrite's idiom; a debug dump lists the reasons).
"""

from __future__ import annotations

import dataclasses
import math
import operator

import torch
import torch.fx

from mpcompiler import dtypes
from mpcompiler.fused import has_kernel, kv_attention
from mpcompiler.ir import META_KEY, NodeRecord, attr_of, derived, graph_record, op_name, planned_dtype, record, value_of
from mpcompiler.ops import bound_args
from mpcompiler.pass_manager import Pass, PassResult
from mpcompiler.rewrite import Match, RewriteRule, apply

aten = torch.ops.aten


def _op(node, *names: str) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and op_name(node) in names


def _only_user(node: torch.fx.Node, user: torch.fx.Node) -> bool:
    return list(node.users) == [user]


def _const(x, value: float, rel: float = 1e-4) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isclose(x, value, rel_tol=rel)


def _split_const(node: torch.fx.Node) -> tuple[torch.fx.Node | None, float | None]:
    """A binary op's (tensor operand, scalar operand), in either order."""
    a, b = node.args[0], node.args[1]
    if isinstance(a, torch.fx.Node) and isinstance(b, (int, float)):
        return a, float(b)
    if isinstance(b, torch.fx.Node) and isinstance(a, (int, float)):
        return b, float(a)
    return None, None


def _rank(node) -> int:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return val.dim() if isinstance(val, torch.Tensor) else -1


# ---- eager attention: matmul(q, k^T) [* scale | / scale] [+ mask] -> softmax(-1) -> matmul(., v)


def _match_attention(out: torch.fx.Node) -> Match | str:
    if not _op(out, "matmul") or _rank(out) != 4:
        return "not a rank-4 matmul"
    probs, v = out.args
    if not _op(probs, "softmax", "_softmax", "_safe_softmax") or not _only_user(probs, out):
        return "first operand is not a softmax read only here"
    dim = probs.args[1]
    if dim not in (-1, 3):
        return f"softmax over dim {dim}, not the last"
    scores, mask, scale = probs.args[0], None, None
    if _op(scores, "add") and len(scores.users) == 1:
        a, b = scores.args
        scores, mask = (a, b) if _op(a, "mul", "div", "matmul") else (b, a)
        if not isinstance(mask, torch.fx.Node) or _rank(mask) > 4:
            return "the added mask is not a tensor of rank <= 4"
    if _op(scores, "mul", "div") and len(scores.users) == 1:
        tensor, c = _split_const(scores)
        if tensor is None or c == 0:
            return "scaled by something other than a constant"
        scale = c if _op(scores, "mul") else 1.0 / c
        scores = tensor
    if not _op(scores, "matmul") or len(scores.users) != 1:
        return "scores are not a matmul read only here"
    q, kt = scores.args
    if not _op(kt, "transpose") or {kt.args[1] % 4, kt.args[2] % 4} != {2, 3}:
        return "keys are not transposed in their last two dims"
    k = kt.args[0]
    if min(_rank(q), _rank(k), _rank(v)) != 4:
        return "q, k, v are not rank 4"
    # no scale written: the scores are used as they are (SDPA's own default would be 1/sqrt(d))
    return {"q": q, "k": k, "v": v, "mask": mask, "scale": scale if scale is not None else 1.0}


def _rewrite_attention(gm, out: torch.fx.Node, m: dict) -> torch.fx.Node:
    with gm.graph.inserting_before(out):
        return gm.graph.call_function(
            aten.scaled_dot_product_attention.default, (m["q"], m["k"], m["v"], m["mask"]), {"scale": m["scale"]}
        )


# ---- GELU formulas: 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))  |  x * 0.5 * (1 + erf(x / sqrt 2))


def _half_times(node: torch.fx.Node, x: torch.fx.Node, inner: torch.fx.Node) -> bool:
    """node == (x * 0.5) * inner or (inner * x) * 0.5 ..., in the spellings HF models use."""
    if not _op(node, "mul"):
        return False
    a, b = node.args
    other = b if a is inner else a if b is inner else None
    if other is None:
        t, c = _split_const(node)  # (x * inner) * 0.5
        return _const(c, 0.5) and _op(t, "mul") and set(t.args) == {x, inner}
    t, c = _split_const(other) if isinstance(other, torch.fx.Node) and _op(other, "mul") else (None, None)
    return t is x and _const(c, 0.5)


def _match_gelu(top: torch.fx.Node) -> Match | str:
    if _op(top, "tanh"):
        inner, c = _split_const(top.args[0]) if _op(top.args[0], "mul") else (None, None)
        if inner is None or not _const(c, math.sqrt(2 / math.pi)) or not _op(inner, "add"):
            return "tanh of something other than sqrt(2/pi) * (x + ...)"
        a, b = inner.args
        cube_term = b if _op(b, "mul") else a
        x = a if cube_term is b else b
        p, c3 = _split_const(cube_term)
        if not _const(c3, 0.044715) or not _op(p, "pow") or p.args[0] is not x or not _const(p.args[1], 3):
            return "not x + 0.044715 * x^3"
        approximate = "tanh"
    elif _op(top, "erf"):
        x, c = _split_const(top.args[0]) if _op(top.args[0], "mul", "div") else (None, None)
        c = (1 / c if c else None) if _op(top.args[0], "div") else c
        if x is None or not _const(c, 1 / math.sqrt(2)):
            return "erf of something other than x / sqrt(2)"
        approximate = "none"
    else:
        return "not tanh or erf"
    if len(top.users) != 1:
        return "read more than once"
    one_plus = next(iter(top.users))
    _, c1 = _split_const(one_plus) if _op(one_plus, "add") else (None, None)
    if not _const(c1, 1.0) or len(one_plus.users) != 1:
        return "not 1 + tanh/erf"
    out = next(iter(one_plus.users))
    if not _half_times(out, x, one_plus):
        return "not 0.5 * x * (...)"
    return {"x": x, "approximate": approximate, "out": out}


def _rewrite_gelu(gm, top: torch.fx.Node, m: dict) -> torch.fx.Node:
    with gm.graph.inserting_before(m["out"]):
        return gm.graph.call_function(aten.gelu.default, (m["x"],), {"approximate": m["approximate"]})


# ---- ONNX Runtime: residual add + layer_norm, linear bias + gelu


def _match_skip_layer_norm(ln: torch.fx.Node) -> Match | str:
    if not _op(ln, "layer_norm"):
        return "not a layer_norm"
    a = bound_args(ln)
    x, weight, bias = a["input"], a.get("weight"), a.get("bias")
    if len(a["normalized_shape"]) != 1 or weight is None or bias is None:
        return "not over the last dim with weight and bias"
    if not _op(x, "add") or not _only_user(x, ln) or len(x.args) != 2:
        return "input is not an add read only here"
    a_, b_ = x.args
    if not all(isinstance(t, torch.fx.Node) for t in (a_, b_)) or a_.meta["val"].shape != b_.meta["val"].shape:
        return "add of differently shaped values (a broadcast)"
    if not 2 <= _rank(a_) <= 3:
        return "SkipLayerNormalization takes 2-D or 3-D input"
    if len({planned_dtype(t) for t in (a_, b_, ln)}) != 1:
        return "operands in different dtypes"
    return {"x": a_, "skip": b_, "weight": weight, "bias": bias, "eps": a.get("eps", 1e-5), "out": ln}


def _rewrite_skip_layer_norm(gm, ln: torch.fx.Node, m: dict) -> torch.fx.Node:
    with gm.graph.inserting_before(ln):
        return gm.graph.call_function(
            torch.ops.mpcompiler.skip_layer_norm.default, (m["x"], m["skip"], m["weight"], m["bias"], float(m["eps"]))
        )


def _match_bias_gelu(g: torch.fx.Node) -> Match | str:
    if not _op(g, "gelu"):
        return "not a gelu"
    lin = g.args[0]
    if not _op(lin, "linear") or not _only_user(lin, g) or len(lin.args) < 3 or lin.args[2] is None:
        return "input is not a linear with a bias, read only here"
    if planned_dtype(lin) != planned_dtype(g):
        return "linear and gelu in different dtypes"
    return {"linear": lin, "bias": lin.args[2], "approximate": g.kwargs.get("approximate", "none"), "out": g}


def _rewrite_bias_gelu(gm, g: torch.fx.Node, m: dict) -> torch.fx.Node:
    lin = m["linear"]
    lin.args = lin.args[:2]
    with gm.graph.inserting_before(g):
        return gm.graph.call_function(torch.ops.mpcompiler.bias_gelu.default, (lin, m["bias"], m["approximate"]))


# ---- ONNX Runtime: BERT's embeddings, layer_norm(word[ids] + position[0:S] [+ segment[...]])

_MOVES = ("expand", "gather", "slice", "unsqueeze", "view", "reshape", "clone", "select", "_to_copy", "to")


def _buffer_value(node) -> torch.Tensor | None:
    if not isinstance(node, torch.fx.Node) or node.op != "get_attr":
        return None
    value = attr_of(node.graph.owning_module, node.target)
    return value if isinstance(value, torch.Tensor) else None


def _all_zeros(idx: torch.fx.Node) -> bool:
    """idx is moved (expanded, gathered, sliced, ...) out of an all-zero integer buffer: zeros too."""
    while _op(idx, *_MOVES):
        idx = idx.args[0]
    value = _buffer_value(idx)
    return value is not None and not value.is_floating_point() and not value.any()


def _positions(idx: torch.fx.Node, seq) -> bool:
    """idx is 0, 1, ..., seq - 1 along its last dim, its other dims 1: a slice from 0 of an arange buffer
    along its last dim (HF's ``position_ids[:, :S]``)."""
    if not _op(idx, "slice") or _rank(idx) < 1 or idx.meta["val"].shape[-1] != seq:
        return False
    a = bound_args(idx)
    value = _buffer_value(a["self"])
    if value is None or value.is_floating_point() or (a.get("start") or 0, a.get("step", 1)) != (0, 1):
        return False
    if a.get("dim", 0) % value.dim() != value.dim() - 1 or math.prod(value.shape[:-1]) != 1:
        return False
    return torch.equal(value.flatten().cpu(), torch.arange(value.numel()))


def _sum_terms(node: torch.fx.Node, terms: list, adds: list) -> None:
    """The leaves of a tree of adds (each read only inside it) rooted at node."""
    if _op(node, "add") and len(node.args) == 2 and all(isinstance(a, torch.fx.Node) for a in node.args):
        adds.append(node)
        for a in node.args:
            if len(a.users) == 1:
                _sum_terms(a, terms, adds)
            else:
                terms.append(a)
    else:
        terms.append(node)


def _match_embed_layer_norm(ln: torch.fx.Node) -> Match | str:
    if not _op(ln, "layer_norm"):
        return "not a layer_norm"
    a = bound_args(ln)
    if len(a["normalized_shape"]) != 1 or a.get("weight") is None or a.get("bias") is None:
        return "not over the last dim with weight and bias"
    terms, adds = [], []
    if _only_user(a["input"], ln):
        _sum_terms(a["input"], terms, adds)
    if not 2 <= len(terms) <= 3 or not all(_op(t, "embedding") and len(t.users) == 1 for t in terms):
        return "input is not a sum of two or three embeddings, each read only there"
    if any(_buffer_value(t.args[0]) is None or _rank(t.args[0]) != 2 for t in terms):
        return "an embedding of something other than a constant table"
    inputs = [t for t in terms if t.args[1].op == "placeholder" and _rank(t.args[1]) == 2]
    if not inputs or any(ln.meta["val"].shape != t.meta["val"].shape for t in inputs):
        return "no embedding of a [B, S] input, or the sum is not [B, S, hidden] (ids broadcast)"
    seq = inputs[0].args[1].meta["val"].shape[-1]
    positions = [t for t in terms if _positions(t.args[1], seq)]
    zeros = [t for t in terms if t not in inputs and _all_zeros(t.args[1])]
    if len(positions) != 1 or len(inputs) + len(positions) + len(zeros) != len(terms):
        return "not ids, positions 0..S-1 and segment ids (an input or all zeros)"
    dtypes = {planned_dtype(n) for n in (*terms, *adds, ln)} | {value_of(t.args[0]).dtype for t in terms}
    if len(dtypes) != 1:
        return "tables, sums and norm in different dtypes"
    # ORT's CUDA kernel sums x * x / hidden in the I/O dtype (contrib_ops/cuda/bert/embed_layer_norm_impl.cu)
    seen = record(a["input"]).range
    if seen is None or seen.absmax**2 > torch.finfo(dtypes.pop()).max / 2:
        return "the embeddings' sum unmeasured, or its square past half the dtype's max (the kernel's statistics)"
    return {"word": inputs[0], "segment": (inputs[1:] + zeros or [None])[0], "position": positions[0],
            "weight": a["weight"], "bias": a["bias"], "eps": a.get("eps", 1e-5)}  # fmt: skip


def _rewrite_embed_layer_norm(gm, ln: torch.fx.Node, m: dict) -> torch.fx.Node:
    """The word and segment tables take their ids; all-zero segments fold their row 0 into the position
    table (summed in fp32, rounded once)."""
    word, position, segment = m["word"], m["position"], m["segment"]
    table, segment_ids, segment_table = position.args[0], None, None
    if segment is not None and segment.args[1].op == "placeholder":
        segment_ids, segment_table = segment.args[1], segment.args[0]
    elif segment is not None:
        rows = _buffer_value(table).float() + _buffer_value(segment.args[0])[0].float()
        name = _in_parent(table.target, "position_and_segment")
        table = _buffer(gm, name, rows.to(_buffer_value(table).dtype), table, ln)
    with gm.graph.inserting_before(ln):
        return gm.graph.call_function(
            torch.ops.mpcompiler.embed_layer_norm.default,
            (word.args[1], segment_ids, word.args[0], table, segment_table, m["weight"], m["bias"], float(m["eps"])),
        )


# ---- ONNX Runtime: self-attention from q, k, v linears of one input, heads split and merged -> Attention


def _heads(t) -> torch.fx.Node | None:
    """The linear when t = transpose(reshape(linear(x), [B, S, H, D]), 1, 2), each read only by the next
    (the reshape may be spelled view or unflatten)."""
    if not _op(t, "transpose") or _rank(t) != 4 or {t.args[1] % 4, t.args[2] % 4} != {1, 2}:
        return None
    split = t.args[0]
    lin = split.args[0] if _op(split, "reshape", "view", "unflatten") and _only_user(split, t) else None
    if not _op(lin, "linear") or not _only_user(lin, split) or _linear_parts(lin) is None or _rank(lin) != 3:
        return None
    b, s, hidden = lin.meta["val"].shape
    return (
        lin if tuple(split.meta["val"].shape[:2]) == (b, s) and split.meta["val"].shape[2:].numel() == hidden else None
    )


def _merged(heads: torch.fx.Node) -> torch.fx.Node | None:
    """The node that merges attention heads [B, H, S, D] back to [B, S, H * D]: (same-shape reshapes,)
    transpose(1, 2), reshape; each read only by the next."""
    node = heads
    while len(node.users) == 1 and _op(next(iter(node.users)), "reshape", "view", "clone"):
        if next(iter(node.users)).meta["val"].shape != heads.meta["val"].shape:
            break
        node = next(iter(node.users))
    t = next(iter(node.users)) if len(node.users) == 1 else None
    if not _op(t, "transpose") or len(t.users) != 1 or {t.args[1] % 4, t.args[2] % 4} != {1, 2}:
        return None
    out = next(iter(t.users))
    return out if _op(out, "reshape", "view", "flatten") and _rank(out) == 3 else None


def _match_qkv_attention(sdpa: torch.fx.Node) -> Match | str:
    if not _op(sdpa, "scaled_dot_product_attention"):
        return "not an SDPA"
    a = bound_args(sdpa)
    if a.get("dropout_p", 0.0) or a.get("is_causal", False) or a.get("enable_gqa", False):
        return "dropout, causal or grouped heads (Attention's form here is a plain self-attention)"
    linears = [_heads(a[k]) for k in ("query", "key", "value")]
    if None in linears:
        return "q, k or v is not a linear's heads (reshape, transpose) read only there"
    x = linears[0].args[0]
    if any(lin.args[0] is not x for lin in linears) or len(set(linears)) != 3:
        return "q, k and v are not three linears of one input"
    q, k, v = (a[k].meta["val"].shape for k in ("query", "key", "value"))
    parts = [_linear_parts(lin) for lin in linears]
    if not q == k == v or len({b is None for _, b in parts}) != 1:
        return "q, k and v differ in shape, or in having a bias"
    chain = [*linears, *(a[k] for k in ("query", "key", "value")), sdpa]
    if len({planned_dtype(n) for n in chain} | {value_of(w).dtype for w, _ in parts}) != 1:
        return "q, k, v, their weights and the attention in different dtypes"
    out = _merged(sdpa)
    if out is None or out.meta["val"].shape != linears[0].meta["val"].shape:
        return "the output is not the heads merged back to [B, S, hidden]"
    if planned_dtype(out) != planned_dtype(sdpa):
        return "the merged heads in another dtype"
    heads = a["query"].meta["val"].shape[1]
    return {"x": x, "linears": linears, "mask": a.get("attn_mask"), "heads": heads, "scale": a.get("scale"), "out": out}


def _packed_projection(gm, linears: list[torch.fx.Node], before: torch.fx.Node) -> tuple:
    """get_attr nodes of the linears' weights stacked and transposed, [in, sum(out)] (their columns in
    order), and of their biases stacked (or None): new buffers of the attention module in this graph."""
    parts = [_linear_parts(lin) for lin in linears]
    packed = []
    for k, name in ((0, "qkv_weight"), (1, "qkv_bias")):
        if parts[0][k] is None:
            packed.append(None)
            continue
        whole = torch.cat([attr_of(gm, p[k].target).detach() for p in parts])
        whole = whole.t().contiguous() if k == 0 else whole
        packed.append(_buffer(gm, _in_parent(parts[0][k].target, name), whole, parts[0][k], before))
    return tuple(packed)


def _in_parent(target: str, name: str) -> str:
    """``name`` in the module above the one holding ``target``: ``a.self.query.weight`` -> ``a.self.name``
    (the attention module of its projections, the embeddings module of its tables)."""
    parent = target.rpartition(".")[0].rpartition(".")[0]
    return f"{parent}.{name}" if parent else name


def _buffer(gm, target: str, tensor: torch.Tensor, like: torch.fx.Node, before: torch.fx.Node) -> torch.fx.Node:
    """``tensor`` as a new buffer at ``target``, and the get_attr node that reads it (``like``'s record)."""
    owner, _, name = target.rpartition(".")
    gm.get_submodule(owner).register_buffer(name, tensor)
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(target)
    node.meta["val"] = tensor
    node.meta[META_KEY] = derived(record(like))
    return node


def _padding_mask_input(mask: torch.fx.Node | None) -> torch.fx.Node | None:
    """The [B, S] integer or bool input an attention mask was built from, if its values come from that
    one input alone (shape reads aside): HF models build their 4-D masks so from ``attention_mask``. (A
    float input would be an additive mask, not a padding mask.)"""
    inputs, seen, stack = set(), set(), [mask] if mask is not None else []
    while stack:
        node = stack.pop()
        if node in seen or _op(node, "sym_size"):  # a shape read carries no values
            continue
        seen.add(node)
        if node.op == "placeholder":
            inputs.add(node)
        stack.extend(node.all_input_nodes)
    source = next(iter(inputs)) if len(inputs) == 1 else None
    return source if _rank(source) == 2 and not source.meta["val"].dtype.is_floating_point else None


def _rewrite_qkv_attention(gm, sdpa: torch.fx.Node, m: dict) -> torch.fx.Node:
    """Attention's packed weight [in, 3 * hidden] (q's columns first) and bias [3 * hidden]. With right
    padding, the mask is the padding-mask input itself, read as each row's length (the model's own
    mask-building ops go dead); a mask not built from one such input stays whole."""
    packed = _packed_projection(gm, m["linears"], m["out"])
    padding = _padding_mask_input(m["mask"]) if m["mask_padding"] == "right" else None
    mask = (padding, True) if padding is not None else (m["mask"], False)
    with gm.graph.inserting_before(m["out"]):
        return gm.graph.call_function(
            torch.ops.mpcompiler.qkv_attention.default, (m["x"], *packed, mask[0], m["heads"], m["scale"], mask[1])
        )


# ---- ONNX Runtime: linear(permute(x)) -> permute(linear(x)), for a permutation that keeps the last dim


def _match_permuted_linear(lin: torch.fx.Node) -> Match | str:
    if not _op(lin, "linear"):
        return "not a linear"
    moved = lin.args[0]
    if not _op(moved, "permute", "transpose") or not _only_user(moved, lin):
        return "input is not a permute or transpose read only here"
    rank = _rank(moved)
    if _op(moved, "permute"):
        perm = [d % rank for d in moved.args[1]]
    else:
        perm = list(range(rank))
        d0, d1 = moved.args[1] % rank, moved.args[2] % rank
        perm[d0], perm[d1] = perm[d1], perm[d0]
    if perm[-1] != rank - 1:
        return "the permutation moves the last dim, which linear reduces over"
    return {"x": moved.args[0], "perm": perm}


def _rewrite_permuted_linear(gm, lin: torch.fx.Node, m: dict) -> torch.fx.Node:
    with gm.graph.inserting_before(lin):
        inner = gm.graph.call_function(aten.linear.default, (m["x"], *lin.args[1:]), dict(lin.kwargs))
        inner.meta[META_KEY] = derived(record(lin))
        return gm.graph.call_function(aten.permute.default, (inner, m["perm"]))


# ---- cuDNN (compiled.cuda_graph()): conv2d + bias [+ residual] + relu, in one dtype


_CONV_DEFAULTS = {"bias": None, "stride": [1], "padding": [0], "dilation": [1], "groups": 1}  # aten.conv2d's


def _match_conv_bias_relu(r: torch.fx.Node) -> Match | str:
    if not _op(r, "relu"):
        return "not a relu"
    conv, residual, reader = r.args[0], None, r
    if _op(conv, "add") and _only_user(conv, r) and len(conv.args) == 2 and not conv.kwargs:
        reader, (a, b) = conv, conv.args
        conv, residual = (a, b) if _op(a, "conv2d") else (b, a)
        if not isinstance(residual, torch.fx.Node) or residual is conv:
            return "the add is not of a conv2d and another tensor"
        if residual.meta["val"].shape != conv.meta["val"].shape:
            return "the residual is broadcast"
    if not _op(conv, "conv2d") or not _only_user(conv, reader):
        return "not a conv2d read only by the add or relu"
    args = bound_args(conv)
    if _rank(conv) != 4 or isinstance(args.get("padding"), str):
        return "not a 4-D conv2d with explicit padding"
    if len({planned_dtype(n) for n in (conv, r, residual or conv)}) != 1:
        return "operands in different dtypes"
    m = {"input": args["input"], "weight": args["weight"], "residual": residual, "out": r}
    m |= {k: args.get(k, default) for k, default in _CONV_DEFAULTS.items()}
    return m | {"residual_bias": _residual_bias(m["bias"], residual, reader)}


def _residual_bias(bias, residual, add: torch.fx.Node) -> torch.fx.Node | None:
    """The constant bias of a residual that is a conv2d read only by ``add`` (ResNet's downsampling conv), where
    the fused conv's own bias is constant too: the fused kernel adds their sum. Inductor runs a conv's bias as
    a pass of its own over the output (cuDNN is slower with it), which a residual read by the fused kernel
    cannot fuse into: at ResNet-50 b128, four passes over ~385 MB."""
    if not _op(residual, "conv2d") or not _only_user(residual, add):
        return None
    theirs = bound_args(residual).get("bias")
    constant = [isinstance(b, torch.fx.Node) and b.op == "get_attr" and len(b.users) == 1 for b in (theirs, bias)]
    return theirs if constant[0] and (bias is None or constant[1]) else None


def _rewrite_conv_bias_relu(gm, r: torch.fx.Node, m: dict) -> torch.fx.Node:
    def pair(v) -> list:
        v = [v] if isinstance(v, int) else list(v)
        return v * 2 if len(v) == 1 else v

    bias, theirs = m["bias"], m["residual_bias"]
    if theirs is not None:  # the residual conv's bias joins this conv's, summed in fp32 and rounded once
        own, residual_bias = attr_of(gm, bias.target).float() if bias is not None else 0.0, attr_of(gm, theirs.target)
        total = (residual_bias.float() + own).to(residual_bias.dtype)
        like = bias if bias is not None else theirs
        bias = _buffer(gm, f"{like.target}_with_residual", total, like, r)
        residual = m["residual"]
        if len(residual.args) > 2:
            residual.update_arg(2, None)
        else:
            residual.update_kwarg("bias", None)
    with gm.graph.inserting_before(r):
        return gm.graph.call_function(
            torch.ops.mpcompiler.conv_bias_relu.default,
            (m["input"], m["weight"], bias, m["residual"], pair(m["stride"]), pair(m["padding"]),
             pair(m["dilation"]), m["groups"]),
        )  # fmt: skip


# ---- ONNX Runtime: a causal LM's attention over its past (kv_attention) -> GroupQueryAttention; RMSNorm


def _match_group_query_attention(node: torch.fx.Node) -> Match | str:
    if node.target is not kv_attention:
        return "not an attention over a KV cache (insert_kv_cache's kv_attention)"
    dtypes = {planned_dtype(a) for a in node.args[:5]}
    if dtypes != {planned_dtype(node)}:
        return "queries, keys, values and the cache in different dtypes"
    return {}


def _rewrite_group_query_attention(gm, node: torch.fx.Node, m: dict) -> torch.fx.Node:
    with gm.graph.inserting_before(node):
        return gm.graph.call_function(
            torch.ops.mpcompiler.group_query_attention.default, (*node.args, node.kwargs.get("scale"))
        )


def _rotated(t) -> tuple | None:
    """(x, cos, sin) when t = x * cos + rotate_half(x) * sin (rotate_half(x) = cat([-x[..., h:], x[..., :h]], -1),
    h half the last dim), the factors in either order."""
    if not _op(t, "add") or len(t.args) != 2:
        return None
    for a, b in (t.args, t.args[::-1]):
        if _op(a, "mul") and _op(b, "mul"):
            for x, cos in (a.args, a.args[::-1]):
                for r, sin in (b.args, b.args[::-1]):
                    if isinstance(x, torch.fx.Node) and _is_rotate_half(r, x):
                        return x, cos, sin
    return None


def _is_rotate_half(r, x: torch.fx.Node) -> bool:
    rank = _rank(x)
    if not _op(r, "cat") or len(r.args[0]) != 2 or (r.args[1] if len(r.args) > 1 else 0) % rank != rank - 1:
        return False
    neg, first = r.args[0]
    half = x.meta["val"].shape[-1] // 2

    def part(node, start: int) -> bool:  # x[..., start:start + half] (the end may be written as "to the end")
        return (
            _op(node, "slice") and node.args[0] is x and node.args[1] % rank == rank - 1
            and node.args[2] == start and node.args[3] >= start + half
        )  # fmt: skip

    return _op(neg, "neg") and part(neg.args[0], half) and part(first, 0) and first.args[3] == half


def _positions_only(nodes: list[torch.fx.Node]) -> tuple[torch.fx.Node, set] | str:
    """The one graph input ``nodes`` are computed from (with constants), and the nodes in between."""
    seen, stack, inputs = set(), list(nodes), set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            inputs.add(n)
        elif n.op == "call_function":
            stack.extend(n.all_input_nodes)
        elif n.op != "get_attr":
            return f"computed by {n.op} {n.target}"
    if len(inputs) != 1 or _rank(next(iter(inputs))) != 2:
        return "not computed from one [B, T] input (the positions) and constants"
    return next(iter(inputs)), seen - inputs


def _match_rotary_group_query_attention(node: torch.fx.Node) -> Match | str:
    if node.target is not kv_attention:
        return "not an attention over a KV cache (insert_kv_cache's kv_attention)"
    q, k, v = node.args[:3]
    rq, rk = _rotated(q), _rotated(k)
    if rq is None or rk is None:
        return "q and k are not rotated as x * cos + rotate_half(x) * sin"
    if rq[1:] != rk[1:]:
        return "q and k rotated by different cos and sin"
    linears = [_heads(rq[0]), _heads(rk[0]), _heads(v)]
    if None in linears:
        return "q, k or v is not a linear's heads (reshape, transpose)"
    x = linears[0].args[0]
    if any(lin.args[0] is not x for lin in linears) or len(set(linears)) != 3:
        return "q, k and v are not three linears of one input"
    parts = [_linear_parts(lin) for lin in linears]
    tables = [t.args[0] if _op(t, "unsqueeze") and t.args[1] == 1 and _rank(t) == 4 else None for t in rq[1:]]
    if None in tables or len({b is None for _, b in parts}) != 1:
        return "cos and sin are not [B, T, head_dim] unsqueezed at dim 1, or q, k, v differ in having a bias"
    chain = [*linears, q, k, v, node, *rq[1:]]
    if len({planned_dtype(n) for n in chain} | {value_of(w).dtype for w, _ in parts}) != 1:
        return "q, k, v, their weights, the rotation and the attention in different dtypes"
    source = _positions_only(tables)
    if isinstance(source, str):
        return f"cos and sin are {source}"
    head = next((u for u in node.users if u.target is operator.getitem and u.args[1] == 0), None)
    out = _merged(head) if head is not None else None
    if out is None or planned_dtype(out) != planned_dtype(node):
        return "the output is not the heads merged back to [B, T, hidden] in the attention's dtype"
    return {"x": x, "linears": linears, "tables": tables, "positions": source[0], "rope": source[1], "out": out}


def _rewrite_rotary_group_query_attention(gm, node: torch.fx.Node, m: dict) -> torch.fx.Node:
    """The packed q/k/v weight; cos and sin tables over every slot of the cache (the model's own rotary
    math, copied once per graph, fed the positions 0 .. max_seq - 1: constants, which the export folds);
    the op."""
    graph, (q, k, _, past_key, past_value, mask) = gm.graph, node.args[:6]
    weight, bias = _packed_projection(gm, m["linears"], m["out"])
    names = [f"{src.name}_table" for src in m["tables"]]
    existing = {n.name: n for n in graph.nodes}
    if names[0] not in existing:  # the graph's first such attention: the tables, which the rest share
        positions = m["positions"]
        with graph.inserting_before(node):
            slots = graph.call_function(aten.arange.default, (graph_record(gm).cache_slots,), {  # insert_kv_cache's
                "dtype": positions.meta["val"].dtype, "device": positions.meta["val"].device})  # fmt: skip
            env = {positions: graph.call_function(aten.unsqueeze.default, (slots, 0))}
            for n in (slots, env[positions]):
                n.meta[META_KEY] = NodeRecord(module_path=record(positions).module_path)
            for n in [n for n in graph.nodes if n in m["rope"]]:  # in graph order
                env[n] = graph.node_copy(n, lambda a: env.get(a, a))
                env[n].meta[META_KEY] = dataclasses.replace(record(n))
            for src, name in zip(m["tables"], names, strict=True):  # [1, L, head_dim] -> [L, head_dim / 2]
                row = graph.call_function(aten.select.int, (env[src], 0, 0))
                table = graph.create_node(
                    "call_function", aten.slice.Tensor, (row, -1, 0, src.meta["val"].shape[-1] // 2), name=name
                )
                for n in (row, table):
                    n.meta[META_KEY] = derived(record(src))
                existing[name] = table
    heads, kv_heads = q.meta["val"].shape[1], k.meta["val"].shape[1]
    with graph.inserting_before(m["out"]):
        fused = graph.call_function(
            torch.ops.mpcompiler.rotary_group_query_attention.default,
            (m["x"], weight, bias, past_key, past_value, mask, *(existing[n] for n in names), heads, kv_heads,
             node.kwargs.get("scale")),
        )  # fmt: skip
        out, present_key, present_value = (graph.call_function(operator.getitem, (fused, i)) for i in range(3))
    fused.meta[META_KEY] = derived(record(node))
    for user in list(node.users):  # the presents (the cache's outputs) now come from the op
        if user.target is operator.getitem and user.args[1] in (1, 2):
            new = (present_key, present_value)[user.args[1] - 1]
            new.meta[META_KEY] = derived(record(user))
            user.replace_all_uses_with(new)
    return out


def _uncast(node):
    return node.args[0] if _op(node, "_to_copy") else node


def _match_rms_norm(out: torch.fx.Node) -> Match | str:
    """weight * (x * rsqrt(mean(x^2, -1) + eps)), the statistics maybe in another dtype (casts around them)."""
    if not _op(out, "mul") or len(out.args) != 2:
        return "not a mul"
    weight = next((a for a in out.args if isinstance(a, torch.fx.Node) and a.op == "get_attr" and _rank(a) == 1), None)
    y = out.args[1] if weight is out.args[0] else out.args[0]
    if weight is None or not _op(y, "mul") or not _only_user(y, out):
        return "not a 1-D weight times a product read only here"
    rsqrt = next((_uncast(a) for a in y.args if _op(_uncast(a), "rsqrt")), None)
    x = next((a for a in y.args if a is not None and _uncast(a) is not rsqrt), None)
    if rsqrt is None or not isinstance(x, torch.fx.Node):
        return "not x * rsqrt(...)"
    add = rsqrt.args[0]
    mean, eps = _split_const(add) if _op(add, "add") else (None, None)
    keepdim = mean.args[2] if _op(mean, "mean") and len(mean.args) > 2 else getattr(mean, "kwargs", {}).get("keepdim")
    if not _op(mean, "mean") or eps is None or mean.args[1] not in ([-1], [_rank(mean) - 1]) or not keepdim:
        return "not rsqrt(mean(., -1, keepdim) + eps)"
    square = mean.args[0]
    if not _op(square, "pow") or not _const(square.args[1], 2) or _uncast(square.args[0]) is not _uncast(x):
        return "not the mean of x squared"
    if value_of(weight) is None or value_of(weight).shape[0] != x.meta["val"].shape[-1]:
        return "the weight is not one per feature"
    if len({planned_dtype(n) for n in (x, weight, out)}) != 1:
        return "x, weight and output in different dtypes"
    return {"x": x, "weight": weight, "eps": eps}


def _rewrite_rms_norm(gm, out: torch.fx.Node, m: dict) -> torch.fx.Node:
    with gm.graph.inserting_before(out):
        return gm.graph.call_function(torch.ops.mpcompiler.rms_norm.default, (m["x"], m["weight"], m["eps"]))


def _match_skip_rms_norm(norm: torch.fx.Node) -> Match | str:
    if norm.target is not torch.ops.mpcompiler.rms_norm.default:
        return "not an rms_norm"
    add = norm.args[0]
    if not _op(add, "add") or len(add.args) != 2 or add.kwargs:
        return "its input is not an add"
    a, b = add.args
    if not all(isinstance(t, torch.fx.Node) for t in (a, b)) or a.meta["val"].shape != b.meta["val"].shape:
        return "add of differently shaped values (a broadcast)"
    if len({planned_dtype(n) for n in (a, b, add, norm)}) != 1:
        return "operands in different dtypes"
    return {"add": add, "x": a, "skip": b}


def _rewrite_skip_rms_norm(gm, norm: torch.fx.Node, m: dict) -> torch.fx.Node:
    """One op for the norm and the sum; the add's other readers (the residual stream) read its sum."""
    graph, add = gm.graph, m["add"]
    with graph.inserting_before(norm):
        both = graph.call_function(torch.ops.mpcompiler.skip_rms_norm.default, (m["x"], m["skip"], *norm.args[1:]))
        out, total = (graph.call_function(operator.getitem, (both, i)) for i in range(2))
    both.meta[META_KEY] = derived(record(norm))
    total.meta["val"], total.meta[META_KEY] = add.meta.get("val"), derived(record(add))
    add.replace_all_uses_with(total, delete_user_cb=lambda user: user is not norm)
    return out


# ---- linears of one input (attention's q, k, v; a gated MLP's gate and up) -> one linear, split


def _linear_parts(lin: torch.fx.Node) -> tuple | None:
    """(weight, bias) get_attr nodes of a linear on constant weights, else None."""
    args = bound_args(lin)
    weight, bias = args.get("weight"), args.get("bias")
    consts = [a for a in (weight, bias) if a is not None]
    if not all(isinstance(a, torch.fx.Node) and a.op == "get_attr" for a in consts) or _rank(weight) != 2:
        return None
    return weight, bias


def match_shared_input_linears(lin: torch.fx.Node) -> Match | str:
    if not _op(lin, "linear") or _linear_parts(lin) is None:
        return "not a linear of constant weights"
    if lin.meta.get(META_KEY) is None or record(lin).dtype is None:
        return "before precision planning (each projection gets its own precision first)"
    x, dtype, bias = lin.args[0], planned_dtype(lin), _linear_parts(lin)[1] is not None
    group = [
        u for u in x.users
        if _op(u, "linear") and u.args[0] is x and _linear_parts(u) is not None and planned_dtype(u) == dtype
        and (_linear_parts(u)[1] is not None) == bias and value_of(_linear_parts(u)[0]).dtype == value_of(
            _linear_parts(lin)[0]).dtype and record(u).fp8 == record(lin).fp8  # e4m3 ones: lower_fp8's, one scale
    ]  # fmt: skip
    order = {n: i for i, n in enumerate(lin.graph.nodes)}
    group.sort(key=order.__getitem__)
    group = list({_linear_parts(u)[0].target: u for u in reversed(group)}.values())[::-1]  # a weight once
    if len(group) < 2 or group[0] is not lin:
        return "not the first of several linears of one input in one dtype"
    return {"linears": group, "out": lin}


def join_linears(gm, lin: torch.fx.Node, m: dict) -> torch.fx.Node:
    """One weight [sum(out), in] in place of the group's: the originals become its row blocks (views:
    no second copy in memory, the same numbers)."""
    group = m["linears"]
    parts = [_linear_parts(n) for n in group]
    sizes = [value_of(w).shape[0] for w, _ in parts]
    fused = []
    for k in (0, 1):
        if parts[0][k] is None:
            fused.append(None)
            continue
        tensors = [attr_of(gm, p[k].target) for p in parts]
        whole = torch.cat([t.detach() for t in tensors])
        for t, block in zip(tensors, whole.split(sizes), strict=True):
            t.data = block
        fused.append(_buffer(gm, f"{parts[0][k].target}_fused", whole, parts[0][k], group[0]))
    with gm.graph.inserting_before(lin):
        out = gm.graph.call_function(aten.linear.default, (lin.args[0], *[f for f in fused if f is not None]))
        split = gm.graph.call_function(aten.split_with_sizes.default, (out, sizes, -1))
        pieces = [gm.graph.call_function(operator.getitem, (split, i)) for i in range(len(group))]
    for node in (out, split):  # calibration saw each linear's output (the pieces'), not the joined one
        node.meta[META_KEY] = derived(record(lin), fused=FUSED_LINEARS, range=None, inner=None)
    for piece, old in zip(pieces[1:], group[1:], strict=True):
        piece.meta["val"] = old.meta.get("val")
        piece.meta[META_KEY] = derived(record(old), fused=FUSED_LINEARS)
        old.replace_all_uses_with(piece)
    return pieces[0]


FUSED_LINEARS = "linears of one input -> one linear + split"


RULES = [
    RewriteRule("attention", _match_attention, _rewrite_attention, "eager attention -> scaled_dot_product_attention"),
    RewriteRule("gelu", _match_gelu, _rewrite_gelu, "GELU formula -> gelu"),
    RewriteRule(
        "embed_layer_norm",
        _match_embed_layer_norm,
        _rewrite_embed_layer_norm,
        "embeddings + layer_norm -> EmbedLayerNormalization",
    ),
    RewriteRule(
        "skip_layer_norm",
        _match_skip_layer_norm,
        _rewrite_skip_layer_norm,
        "add + layer_norm -> SkipLayerNormalization",
    ),
    RewriteRule("bias_gelu", _match_bias_gelu, _rewrite_bias_gelu, "linear bias + gelu -> BiasGelu/FastGelu"),
    RewriteRule(
        "qkv_attention",
        _match_qkv_attention,
        _rewrite_qkv_attention,
        "q/k/v linears + attention -> Attention (packed QKV)",
    ),
    RewriteRule(
        "conv_bias_relu", _match_conv_bias_relu, _rewrite_conv_bias_relu, "conv2d + bias [+ add] + relu -> cuDNN"
    ),
    RewriteRule(
        "permuted_linear", _match_permuted_linear, _rewrite_permuted_linear, "linear(permute) -> permute(linear)"
    ),
    RewriteRule("shared_input_linears", match_shared_input_linears, join_linears, FUSED_LINEARS),
    RewriteRule(
        "rotary_group_query_attention",
        _match_rotary_group_query_attention,
        _rewrite_rotary_group_query_attention,
        "q/k/v linears + rotary + attention over a KV cache -> GroupQueryAttention (packed QKV, do_rotary)",
    ),
    RewriteRule(
        "group_query_attention",
        _match_group_query_attention,
        _rewrite_group_query_attention,
        "attention over a KV cache -> GroupQueryAttention",
    ),
    RewriteRule("rms_norm", _match_rms_norm, _rewrite_rms_norm, "RMSNorm -> SimplifiedLayerNormalization"),
    RewriteRule(
        "skip_rms_norm",
        _match_skip_rms_norm,
        _rewrite_skip_rms_norm,
        "add + RMSNorm -> SkipSimplifiedLayerNormalization",
    ),
]


class LowerFused(Pass):
    """Rewrite patterns into the fused ops ``target`` has kernels for. ``padding="right"``: attention
    masks are right padding, read as each row's count of tokens (see mpcompiler.fused.qkv_attention)."""

    def __init__(self, *, target: str, padding: str = "any"):
        self.target, self.padding = target, padding

    rewrites_graph = True

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        stats, reasons, dead = {rule.name: 0 for rule in RULES}, {}, False
        for rule in RULES:  # rule by rule over the whole graph: a later rule sees the earlier ones' fused ops
            fired = apply([n for n in gm.graph.nodes if n.op == "call_function"], [self._lowering(gm, rule)], reasons)
            stats[rule.name] += fired[rule.name]
            dead = gm.graph.eliminate_dead_code() or dead  # a rewrite leaves the nodes it replaced dead
        return PassResult(modified=dead or any(stats.values()), stats=stats, reasons=reasons)

    def _lowering(self, gm: torch.fx.GraphModule, rule: RewriteRule) -> RewriteRule:
        """``rule`` where ``self.target`` has the fused op's kernel in the node's planned dtype; its fused op
        takes the replaced output's value and record."""

        def match(node: torch.fx.Node) -> Match | str:
            m = rule.match(node)
            planned = getattr(node.meta.get(META_KEY), "dtype", None)  # None before precision work
            if not isinstance(m, str) and not has_kernel(rule.name, self.target, planned):
                return f"{self.target} has no {rule.name} kernel" + (f" for {dtypes.short(planned)}" if planned else "")
            return m

        def rewrite(node: torch.fx.Node, m: Match) -> None:
            out = m.get("out", node)
            fused = rule.rewrite(gm, node, m | {"mask_padding": self.padding})
            fused.meta["val"] = out.meta.get("val")
            fused.meta[META_KEY] = derived(record(out), fused=rule.why)
            out.replace_all_uses_with(fused)

        return RewriteRule(rule.name, match, rewrite, rule.why)
