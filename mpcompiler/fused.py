"""Fused ops, defined once: a torch.library custom op each (CPU and CUDA, composed of ATen ops) and its
ONNX translation (an ONNX Runtime contrib op), and :data:`FUSED_OPS`, one row per fused op: the targets
with a kernel for it and in which dtypes, the op ``lower_fused``'s rule of the same name emits, its
translation, the contrib schemas that writes and the opset it needs (each row's comment says what the
op is and why its targets are what they are). :data:`KERNELS`, :func:`has_kernel`, :data:`OPSET_23_OPS`
and :func:`onnx_translations` are read from it.

``lower_fused`` consults the kernels so that nothing is emitted that the target cannot run fused.

Adding a fused op: its custom op (with a fake) and translation here, its row in :data:`FUSED_OPS`, and
the rule that writes it (a match and a rewrite) in ``passes/lower_fused.py``'s ``RULES``, by the row's
name; tests/test_lower_fused.py checks that rows and rules agree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import onnx
import onnx_ir as ir
import onnxscript
import onnxscript.onnx_opset
import torch
import torch.nn.functional as F
from onnx.defs import OpSchema


@torch.library.custom_op("mpcompiler::skip_layer_norm", mutates_args=())
def skip_layer_norm(
    x: torch.Tensor, skip: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """layer_norm(x + skip) over the last dim."""
    return F.layer_norm(x + skip, (x.shape[-1],), weight, bias, eps)


@skip_layer_norm.register_fake
def _(x, skip, weight, bias, eps):
    return torch.empty_like(x)


@torch.library.custom_op("mpcompiler::bias_gelu", mutates_args=())
def bias_gelu(x: torch.Tensor, bias: torch.Tensor, approximate: str) -> torch.Tensor:
    """gelu(x + bias), erf (``"none"``) or tanh form."""
    return F.gelu(x + bias, approximate=approximate)


@bias_gelu.register_fake
def _(x, bias, approximate):
    return torch.empty_like(x)


@torch.library.custom_op("mpcompiler::conv_bias_relu", mutates_args=())
def conv_bias_relu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> torch.Tensor:
    """relu(conv2d(x, weight, bias) + residual), the residual optional."""
    y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    return F.relu(y if residual is None else y + residual)


@conv_bias_relu.register_kernel("cuda")
def _(x, weight, bias, residual, stride, padding, dilation, groups):
    if residual is None:
        return torch.ops.aten.cudnn_convolution_relu(x, weight, bias, stride, padding, dilation, groups)
    return torch.ops.aten.cudnn_convolution_add_relu(x, weight, residual, 1.0, bias, stride, padding, dilation, groups)


@conv_bias_relu.register_fake
def _(x, weight, bias, residual, stride, padding, dilation, groups):
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


def _new_slots(lengths: torch.Tensor, length: int) -> torch.Tensor:
    """[B, T]: the cache slots (each row's positions) of T new tokens, rows of ``lengths`` [B, 1] tokens
    (past and new) packed at the front."""
    return (lengths - length).clamp(min=0) + torch.arange(length, device=lengths.device)


def kv_attention(query, key, value, past_key, past_value, attention_mask, scale: float | None = None):
    """Attention of T new tokens over a KV cache laid out as ONNX Runtime's GroupQueryAttention lays it
    out: row b's tokens fill slots [0, L_b), L_b = ``attention_mask[b].sum()`` (past and new tokens), and
    its T new keys and values are written at slots max(L_b - T, 0) + t (a prompt's right padding is
    written too, and never seen). Query t sees the filled slots up to its own.

    query [B, heads, T, head_dim], key/value [B, kv_heads, T, head_dim], past_key/past_value [B, kv_heads,
    P, head_dim], attention_mask [B, P + T]. Returns the attention [B, heads, T, head_dim] and the present
    keys and values [B, kv_heads, P + T, head_dim]."""
    batch, kv_heads, length, dim = key.shape
    for x in (attention_mask, past_key, past_value):
        torch._check(x.shape[0] == batch)  # one batch dim when exported
    lengths = attention_mask.sum(-1, keepdim=True)  # [B, 1]
    slots = _new_slots(lengths, length)
    index = slots[:, None, :, None].expand(batch, kv_heads, length, dim)
    present_key = torch.cat([past_key, torch.zeros_like(key)], 2).scatter(2, index, key)
    present_value = torch.cat([past_value, torch.zeros_like(value)], 2).scatter(2, index, value)
    s = torch.arange(present_key.shape[2], device=key.device)
    seen = ((s <= slots[..., None]) & (s < lengths[..., None])) | (s == slots[..., None])  # [B, T, P + T]
    out = F.scaled_dot_product_attention(query, present_key, present_value, seen[:, None], scale=scale, enable_gqa=True)
    return out, present_key, present_value


@torch.library.custom_op("mpcompiler::group_query_attention", mutates_args=())
def group_query_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    past_key: torch.Tensor,
    past_value: torch.Tensor,
    attention_mask: torch.Tensor,
    scale: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`kv_attention`, as one op (ONNX Runtime's GroupQueryAttention)."""
    return kv_attention(query, key, value, past_key, past_value, attention_mask, scale)


@group_query_attention.register_fake
def _(query, key, value, past_key, past_value, attention_mask, scale):
    for x in (attention_mask, past_key, past_value):
        torch._check(x.shape[0] == query.shape[0])
    present = (key.shape[0], key.shape[1], past_key.shape[2] + key.shape[2], key.shape[3])
    return query.new_empty((*query.shape[:3], value.shape[3])), key.new_empty(present), value.new_empty(present)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] over the last dim (the rotary embedding of Llama-family models)."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], -1)


@torch.library.custom_op("mpcompiler::rotary_group_query_attention", mutates_args=())
def rotary_group_query_attention(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    past_key: torch.Tensor,
    past_value: torch.Tensor,
    attention_mask: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    num_heads: int,
    kv_heads: int,
    scale: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`kv_attention` of x [B, T, in]'s q, k and v (x @ weight + bias, weight [in, (num_heads + 2 *
    kv_heads) * head_dim], q's columns first), q and k rotated at each token's slot (its position: the
    cache layout counts positions from 0 in each row), ``cos_cache``/``sin_cache`` [slots, head_dim / 2]
    being cos and sin of each slot's angles. Returns the attention, heads merged, [B, T, num_heads *
    head_dim], and the present keys and values."""
    qkv = x @ weight if bias is None else x @ weight + bias
    dim = weight.shape[1] // (num_heads + 2 * kv_heads)
    q, k, v = (
        t.unflatten(-1, (-1, dim)).transpose(1, 2)
        for t in qkv.split([num_heads * dim, kv_heads * dim, kv_heads * dim], -1)
    )
    slots = _new_slots(attention_mask.sum(-1, keepdim=True), x.shape[1])
    cos, sin = (torch.cat([c[slots]] * 2, -1)[:, None] for c in (cos_cache, sin_cache))  # [B, 1, T, head_dim]
    q, k = (t * cos + _rotate_half(t) * sin for t in (q, k))
    out, present_key, present_value = kv_attention(q, k, v, past_key, past_value, attention_mask, scale)
    return out.transpose(1, 2).flatten(2), present_key, present_value


@rotary_group_query_attention.register_fake
def _(x, weight, bias, past_key, past_value, attention_mask, cos_cache, sin_cache, num_heads, kv_heads, scale):
    for t in (attention_mask, past_key, past_value):
        torch._check(t.shape[0] == x.shape[0])  # one batch dim when exported
    dim = weight.shape[1] // (num_heads + 2 * kv_heads)
    present = (x.shape[0], kv_heads, past_key.shape[2] + x.shape[1], dim)
    return x.new_empty((*x.shape[:2], num_heads * dim)), x.new_empty(present), x.new_empty(present)


@torch.library.custom_op("mpcompiler::qkv_attention", mutates_args=())
def qkv_attention(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    num_heads: int,
    scale: float | None,
    key_lengths: bool,
) -> torch.Tensor:
    """Self-attention of x [B, S, in]: q, k, v = (x @ weight + bias) split in three, each into
    ``num_heads`` heads; SDPA with ``mask`` (bool or additive, broadcast to [B, heads, S, S]); heads
    merged: [B, S, hidden]. weight is [in, 3 * hidden], q's columns first (ONNX Runtime's layout).

    ``key_lengths``: ``mask`` is instead a [B, S] padding mask (nonzero: a token), read as right padding:
    row b attends its first L_b keys, L_b its count of tokens (ONNX Runtime's 1-D mask index, which its
    fastest kernels take)."""
    qkv = x @ weight if bias is None else x @ weight + bias
    q, k, v = (t.unflatten(-1, (num_heads, -1)).transpose(1, 2) for t in qkv.chunk(3, -1))
    if key_lengths and mask is not None:
        lengths = (mask != 0).sum(-1)
        mask = (torch.arange(x.shape[1], device=x.device) < lengths[:, None])[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, mask, scale=scale).transpose(1, 2).flatten(2)


@qkv_attention.register_fake
def _(x, weight, bias, mask, num_heads, scale, key_lengths):
    return x.new_empty((*x.shape[:-1], weight.shape[1] // 3))


@torch.library.custom_op("mpcompiler::embed_layer_norm", mutates_args=())
def embed_layer_norm(
    input_ids: torch.Tensor,
    segment_ids: torch.Tensor | None,
    word: torch.Tensor,
    position: torch.Tensor,
    segment: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """layer_norm(word[input_ids] + position[0:S] + segment[segment_ids]) over the last dim, S the
    sequence length of input_ids [B, S] (without ``segment``, that term is 0)."""
    x = F.embedding(input_ids, word) + position[: input_ids.shape[-1]]
    if segment is not None:
        x = x + F.embedding(segment_ids, segment)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


@embed_layer_norm.register_fake
def _(input_ids, segment_ids, word, position, segment, weight, bias, eps):
    return word.new_empty((*input_ids.shape, word.shape[1]))


@torch.library.custom_op("mpcompiler::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) over the last dim, in fp32, times weight, in x's dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


@rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x)


@torch.library.custom_op("mpcompiler::skip_rms_norm", mutates_args=())
def skip_rms_norm(
    x: torch.Tensor, skip: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rms_norm` of x + skip, and the sum."""
    total = x + skip
    return rms_norm(total, weight, eps), total


@skip_rms_norm.register_fake
def _(x, skip, weight, eps):
    total = x + skip  # export learns that the shapes are equal, as from the add it replaces
    return torch.empty_like(total), torch.empty_like(total)


# ONNX Runtime's contrib schemas (github.com/microsoft/onnxruntime, docs/ContribOperators.md), by name,
# which onnxscript needs to build the nodes and onnx.checker to check them; registered for the rows that
# write them.
_T = ("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "")


def _param(name: str, optional: bool = False) -> OpSchema.FormalParameter:
    option = OpSchema.FormalParameterOption.Optional if optional else OpSchema.FormalParameterOption.Single
    return OpSchema.FormalParameter(name, "T", "", param_option=option)


_M = ("M", ["tensor(int32)"], "")


def _int32(name: str) -> OpSchema.FormalParameter:
    return OpSchema.FormalParameter(name, "M", "")


_SCHEMAS = {
    schema.name: schema
    for schema in [
        OpSchema(
            "Attention",
            "com.microsoft",
            1,
            inputs=[
                _param("input"),
                _param("weights"),
                _param("bias", True),
                OpSchema.FormalParameter("mask_index", "M", "", param_option=OpSchema.FormalParameterOption.Optional),
                _param("past", True),
                _param("attention_bias", True),
                OpSchema.FormalParameter(
                    "past_sequence_length", "M", "", param_option=OpSchema.FormalParameterOption.Optional
                ),
            ],
            outputs=[_param("output"), _param("present", True)],
            type_constraints=[_T, _M],
            attributes=[
                OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, ""),
                OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "", required=False),
                OpSchema.Attribute("unidirectional", OpSchema.AttrType.INT, "", required=False),
                OpSchema.Attribute("mask_filter_value", OpSchema.AttrType.FLOAT, "", required=False),
            ],
        ),
        OpSchema(
            "GroupQueryAttention",
            "com.microsoft",
            1,
            inputs=[
                _param("query"),
                _param("key", True),
                _param("value", True),
                _param("past_key", True),
                _param("past_value", True),
                _int32("seqlens_k"),
                _int32("total_sequence_length"),
                _param("cos_cache", True),
                _param("sin_cache", True),
            ],
            outputs=[_param("output"), _param("present_key", True), _param("present_value", True)],
            type_constraints=[_T, _M],
            attributes=[
                OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, ""),
                OpSchema.Attribute("kv_num_heads", OpSchema.AttrType.INT, ""),
                OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "", required=False),
                OpSchema.Attribute("do_rotary", OpSchema.AttrType.INT, "", required=False),
                OpSchema.Attribute("rotary_interleaved", OpSchema.AttrType.INT, "", required=False),
            ],
        ),
        OpSchema(
            "SkipSimplifiedLayerNormalization",
            "com.microsoft",
            1,
            inputs=[_param("input"), _param("skip"), _param("gamma"), _param("bias", True)],
            outputs=[
                _param("output"),
                OpSchema.FormalParameter("mean", "U", "", param_option=OpSchema.FormalParameterOption.Optional),
                OpSchema.FormalParameter("inv_std_var", "U", "", param_option=OpSchema.FormalParameterOption.Optional),
                _param("input_skip_bias_sum", True),
            ],
            type_constraints=[_T, ("U", ["tensor(float)"], "")],
            attributes=[OpSchema.Attribute("epsilon", OpSchema.AttrType.FLOAT, "", required=False)],
        ),
        OpSchema(  # ONNX Runtime registers it in the ONNX domain
            "SimplifiedLayerNormalization",
            "",
            1,
            inputs=[_param("X"), _param("scale")],
            outputs=[_param("Y")],
            type_constraints=[_T],
            attributes=[
                OpSchema.Attribute("axis", OpSchema.AttrType.INT, "", required=False),
                OpSchema.Attribute("epsilon", OpSchema.AttrType.FLOAT, "", required=False),
                OpSchema.Attribute("stash_type", OpSchema.AttrType.INT, "", required=False),
            ],
        ),
        OpSchema(
            "SkipLayerNormalization",
            "com.microsoft",
            1,
            inputs=[_param("input"), _param("skip"), _param("gamma"), _param("beta", True), _param("bias", True)],
            outputs=[_param("output")],
            type_constraints=[_T],
            attributes=[OpSchema.Attribute("epsilon", OpSchema.AttrType.FLOAT, "", required=False)],
        ),
        OpSchema(
            "EmbedLayerNormalization",
            "com.microsoft",
            1,
            inputs=[
                _int32("input_ids"),
                OpSchema.FormalParameter("segment_ids", "M", "", param_option=OpSchema.FormalParameterOption.Optional),
                _param("word_embedding"),
                _param("position_embedding"),
                _param("segment_embedding", True),
                _param("gamma"),
                _param("beta", True),
                OpSchema.FormalParameter("mask", "M", "", param_option=OpSchema.FormalParameterOption.Optional),
                OpSchema.FormalParameter("position_ids", "M", "", param_option=OpSchema.FormalParameterOption.Optional),
            ],
            outputs=[_param("output"), _int32("mask_index"), _param("embedding_sum", True)],  # mask_index: required
            type_constraints=[_T, _M],
            attributes=[
                OpSchema.Attribute("epsilon", OpSchema.AttrType.FLOAT, "", required=False),
                OpSchema.Attribute("mask_index_type", OpSchema.AttrType.INT, "", required=False),
            ],
        ),
        OpSchema(
            "BiasGelu",
            "com.microsoft",
            1,
            inputs=[_param("A"), _param("B")],
            outputs=[_param("C")],
            type_constraints=[_T],
        ),
        OpSchema(
            "FastGelu",
            "com.microsoft",
            1,
            inputs=[_param("X"), _param("bias", True)],
            outputs=[_param("Y")],
            type_constraints=[_T],
        ),
    ]
}

_MSFT = onnxscript.values.Opset("com.microsoft", 1)
_OP = onnxscript.onnx_opset.opset23


def _skip_layer_norm_onnx(x, skip, weight, bias, eps: float):
    return _MSFT.SkipLayerNormalization(x, skip, weight, bias, epsilon=eps)


def _group_query_attention_onnx(query, key, value, past_key, past_value, attention_mask, scale: float | None = None):
    """GroupQueryAttention on [B, T, heads * head_dim] inputs; each row's length from attention_mask."""
    heads, kv_heads = query.shape[1], key.shape[1]

    def packed(x):  # [B, H, T, D] -> [B, T, H * D]
        return _OP.Reshape(_OP.Transpose(x, perm=[0, 2, 1, 3]), _OP.Constant(value_ints=[0, 0, -1]))

    attrs = {"num_heads": heads, "kv_num_heads": kv_heads} | ({"scale": scale} if scale is not None else {})
    out, present_key, present_value = _MSFT.GroupQueryAttention(
        packed(query), packed(key), packed(value), past_key, past_value, *_lengths(attention_mask), **attrs
    )
    out = _OP.Transpose(_OP.Reshape(out, _OP.Constant(value_ints=[0, 0, heads, -1])), perm=[0, 2, 1, 3])
    return out, present_key, present_value


def _lengths(attention_mask):
    """GroupQueryAttention's seqlens_k (each row's length - 1) and total_sequence_length, int32."""
    one = _OP.Constant(value_ints=[1])
    seqlens_k = _OP.Cast(_OP.Sub(_OP.ReduceSum(attention_mask, one, keepdims=0), _OP.CastLike(1, attention_mask)), to=6)
    return seqlens_k, _OP.Cast(_OP.Squeeze(_OP.Shape(attention_mask, start=1, end=2)), to=6)  # 6: int32


def _rotary_group_query_attention_onnx(
    x, weight, bias, past_key, past_value, attention_mask, cos_cache, sin_cache, num_heads: int, kv_heads: int,
    scale: float | None = None,
):  # fmt: skip
    """One MatMul for q, k and v, then GroupQueryAttention on the packed projection with its own rotary."""
    packed = _OP.MatMul(x, weight) if bias is None else _OP.Add(_OP.MatMul(x, weight), bias)
    attrs = {"num_heads": num_heads, "kv_num_heads": kv_heads, "do_rotary": 1, "rotary_interleaved": 0}
    attrs |= {"scale": scale} if scale is not None else {}
    return _MSFT.GroupQueryAttention(
        packed, None, None, past_key, past_value, *_lengths(attention_mask), cos_cache, sin_cache, **attrs
    )


def _qkv_attention_onnx(x, weight, bias, mask, num_heads: int, scale: float | None = None, key_lengths: bool = False):
    """``Attention`` with the packed q/k/v weight and bias; the mask as its [B|1, 1, S, S] attention_bias
    or, with ``key_lengths``, the [B, S] padding mask as its 1-D mask index (each row's count of tokens:
    right padding)."""
    attrs = {"num_heads": num_heads} | ({"scale": scale} if scale is not None else {})
    if mask is not None and key_lengths:  # each row's count of tokens, int32 (6)
        counts = _OP.ReduceSum(_OP.Cast(mask, to=6), _OP.Constant(value_ints=[-1]), keepdims=0)
        out, _ = _MSFT.Attention(x, weight, bias, counts, **attrs)
        return out
    if mask is not None:
        if mask.dtype not in (ir.DataType.BOOL, x.dtype):  # ORT takes it in x's dtype; clamped: no -inf
            mask = _OP.CastLike(_OP.Max(mask, _OP.CastLike(MASKED, mask)), x)
        q_len = _OP.Shape(x, start=1, end=2)
        mask = _additive_mask(mask, x, q_len, q_len)
    out, _ = _MSFT.Attention(x, weight, bias, None, None, mask, **attrs)
    return out


def _embed_layer_norm_onnx(input_ids, segment_ids, word, position, segment, weight, bias, eps: float):
    """EmbedLayerNormalization, which reads the ids as int32 (6) and takes positions 0..S-1 itself."""
    segments = _OP.Cast(segment_ids, to=6) if segment_ids is not None else None
    out, _, _ = _MSFT.EmbedLayerNormalization(
        _OP.Cast(input_ids, to=6), segments, word, position, segment, weight, bias, epsilon=eps
    )
    return out


def _rms_norm_onnx(x, weight, eps: float):
    return _OP.SimplifiedLayerNormalization(x, weight, axis=-1, epsilon=eps, stash_type=1)


def _skip_rms_norm_onnx(x, skip, weight, eps: float):
    out, _, _, total = _MSFT.SkipSimplifiedLayerNormalization(x, skip, weight, epsilon=eps)
    return out, total


def _bias_gelu_onnx(x, bias, approximate: str):
    if approximate == "tanh":
        return _MSFT.FastGelu(x, bias)
    return _MSFT.BiasGelu(x, bias)


def _attention_onnx(
    query,
    key,
    value,
    attn_mask=None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
):
    """SDPA as opset 23's ``Attention``, in the forms ONNX Runtime 1.31 runs on CPU and CUDA alike:
    the mask additive and 4-D with its query dim spelled out (ORT checks ``mask.shape[-2] == q_len``
    on the CPU, reads a 3-D mask's first dim as the batch on CUDA, and has no bool mask on CUDA), and
    grouped key/value heads repeated (its CUDA Attention has no GQA)."""
    if enable_gqa and query.shape[1] != key.shape[1]:
        key, value = _repeat_heads(key, query.shape[1]), _repeat_heads(value, query.shape[1])
    if attn_mask is not None:
        attn_mask = _additive_mask(attn_mask, query, _OP.Shape(query, start=2, end=3), _OP.Constant(value_ints=[1]))
    attrs = {"is_causal": int(is_causal)} | ({"scale": scale} if scale is not None else {})
    y, _, _, _ = _OP.Attention(query, key, value, attn_mask, **attrs)
    return y


def _additive_mask(mask, like, q_len, k_len):
    """A bool or additive mask as an additive one in ``like``'s dtype, 4-D, expanded to [., ., q_len,
    k_len] (1: kept as it is). True attends; False becomes a large negative, not -inf: no NaN rows."""
    rank = len(mask.shape)
    if mask.dtype == ir.DataType.BOOL:
        mask = _OP.Where(mask, _OP.CastLike(0.0, like), _OP.CastLike(MASKED, like))
    if rank < 4:
        mask = _OP.Unsqueeze(mask, _OP.Constant(value_ints=list(range(4 - rank))))
    one = _OP.Constant(value_ints=[1])
    return _OP.Expand(mask, _OP.Concat(one, one, q_len, k_len, axis=0))


def _repeat_heads(x, heads: int):
    """[B, Hkv, T, D] -> [B, heads, T, D], each key/value head repeated for its group of query heads."""
    groups = heads // x.shape[1]
    shape = _OP.Shape(x)
    b, hkv, rest = _OP.Slice(shape, [0], [1]), _OP.Slice(shape, [1], [2]), _OP.Slice(shape, [2], [4])
    group = _OP.Constant(value_ints=[groups])
    x = _OP.Expand(_OP.Unsqueeze(x, [2]), _OP.Concat(b, hkv, group, rest, axis=0))
    return _OP.Reshape(x, _OP.Concat(b, _OP.Constant(value_ints=[heads]), rest, axis=0))


MASKED = -10000.0  # what a bool mask's False becomes: exp(-10000) is 0 in every float dtype, fp16 holds it

# ---- the table: one row per fused op

H, B, S = torch.float16, torch.bfloat16, torch.float32
ALL = frozenset({H, B, S})
TARGETS = ("fx-cuda", "fx-cpu", "ort-cuda", "ort-cpu")


@dataclass(frozen=True)
class FusedOp:
    """One fused op: where it has a kernel, what lower_fused's rule of its name emits, and its ONNX form."""

    kernels: dict[str, frozenset[torch.dtype]]  # target -> dtypes with a fused kernel there (absent: none)
    op: torch._ops.OpOverload | None = None  # what the rule emits (None: plain ATen ops, each as it was)
    onnx: Callable | None = None  # its torch.onnx translation (None: torch.onnx's own, or not exported fused)
    schemas: tuple[OpSchema, ...] = ()  # the contrib ops the translation writes
    opset: int = 1  # the ONNX opset the export writes where the op is in the graph (OPSET_23_OPS)


FUSED_OPS: dict[str, FusedOp] = {
    # ATen's scaled_dot_product_attention. FX on CUDA and CPU runs it fused; the export writes it as ONNX
    # ``Attention`` from opset 23, which ONNX Runtime's CUDA provider runs fused (measured: docs/perf.md).
    # Eager attention (matmul, scale, mask, softmax, matmul) is rewritten to it.
    "attention": FusedOp(
        dict.fromkeys(TARGETS, ALL), torch.ops.aten.scaled_dot_product_attention.default, _attention_onnx, opset=23
    ),
    # a GELU written out as a formula (GPT-2's tanh form, the erf form) -> one aten.gelu
    "gelu": FusedOp(dict.fromkeys(TARGETS, ALL), torch.ops.aten.gelu.default),
    # residual add + layer_norm -> SkipLayerNormalization (fp32 statistics inside, fp16 I/O). For FX it
    # would be two kernels either way: not emitted.
    "skip_layer_norm": FusedOp(
        {"ort-cuda": ALL, "ort-cpu": frozenset({H, S})},
        torch.ops.mpcompiler.skip_layer_norm.default,
        _skip_layer_norm_onnx,
        (_SCHEMAS["SkipLayerNormalization"],),
    ),
    # linear's bias + GELU -> BiasGelu (erf) / FastGelu (tanh). ONNX Runtime's CPU provider has them in
    # fp32 only: not emitted for an fp16 CPU artifact.
    "bias_gelu": FusedOp(
        {"ort-cuda": ALL, "ort-cpu": frozenset({S})},
        torch.ops.mpcompiler.bias_gelu.default,
        _bias_gelu_onnx,
        (_SCHEMAS["BiasGelu"], _SCHEMAS["FastGelu"]),
    ),
    # relu(conv2d + bias [+ residual]) -> one cuDNN convolution with the bias, the residual add and the
    # ReLU in its epilogue (aten.cudnn_convolution_relu/_add_relu), for compiled.cuda_graph(), which lowers
    # it on the planned graph: one kernel instead of the convolution and an elementwise pass over its output
    # (1.4-2.5x faster on ResNet-50's layers, H100, docs/perf.md), and the sum rounded once. A residual that
    # is a conv's own output (ResNet's downsampling) hands its bias to the fused conv, so Inductor runs no
    # bias pass over it. Conv + BatchNorm is folded at compile time (fold_batch_norm). ONNX Runtime's FusedConv
    # (conv + bias + activation) has no fp16 CUDA kernel, so the ONNX artifact leaves convs to ORT.
    "conv_bias_relu": FusedOp({"fx-cuda": frozenset({H, B})}, torch.ops.mpcompiler.conv_bias_relu.default),
    # not a fused op but a layout ONNX Runtime needs: linear(permute(x)) with the last dim in place is
    # written permute(linear(x)). ONNX Runtime 1.30-1.32's CPU provider crashes the process (SIGSEGV, in
    # its MatmulTransposeFusion at the default optimization level) creating a session for an fp16
    # Transpose(perm=[1, 0, 2]) feeding a MatMul with an fp16 weight: nn.MultiheadAttention(batch_first=
    # True)'s input projection.
    "permuted_linear": FusedOp({"ort-cuda": ALL, "ort-cpu": ALL}),
    # linears reading one input in one planned dtype (attention's q, k and v, a gated MLP's gate and up) ->
    # one linear on their weights stacked, and a split: one GEMM reading the weights in one pass where a
    # decode step's small GEMMs are each bound by launch and tail (FX generation steps; planned graphs
    # only, so each projection's precision is its own: its match says why).
    "shared_input_linears": FusedOp({"fx-cuda": ALL, "fx-cpu": ALL}),
    # a causal LM's attention over its past keys and values (the ONNX artifact's kv_attention) ->
    # GroupQueryAttention, ONNX Runtime's fused attention with a KV cache (grouped heads read in place,
    # flash kernels on CUDA). Its cache layout is its own: each row's tokens packed at the front, lengths
    # from attention_mask (prompts right-padded). fp16/bf16 on CUDA; fp16/fp32 on the CPU. attention_bias
    # has no CUDA kernel, hence that layout and not a mask.
    "group_query_attention": FusedOp(
        {"ort-cuda": frozenset({H, B}), "ort-cpu": frozenset({H, S})},
        torch.ops.mpcompiler.group_query_attention.default,
        _group_query_attention_onnx,
        (_SCHEMAS["GroupQueryAttention"],),
        opset=23,
    ),
    # the same attention when its q, k and v are the heads of linears of one input and q and k are rotated
    # as Llama-family models rotate them (q * cos + rotate_half(q) * sin, cos and sin computed from the
    # positions alone) -> GroupQueryAttention on the packed q/k/v projection (one GEMM instead of three)
    # with its own rotary (do_rotary; cos/sin tables: the model's own rotary math at every slot of the
    # cache, constants), where the plain form runs ~12 ops a layer for it.
    "rotary_group_query_attention": FusedOp(
        {"ort-cuda": frozenset({H, B}), "ort-cpu": frozenset({H, S})},
        torch.ops.mpcompiler.rotary_group_query_attention.default,
        _rotary_group_query_attention_onnx,
        (_SCHEMAS["GroupQueryAttention"],),
        opset=23,
    ),
    # self-attention whose q, k and v are linears of one input, heads split and merged around SDPA ->
    # com.microsoft.Attention: one GEMM on the packed q/k/v weight, the bias add and the heads' layout in
    # one kernel. The mask goes in as its additive attention_bias (exact for any mask, but ONNX Runtime
    # 1.31's CUDA provider then runs attention unfused: two GEMMs and a softmax, profiled in docs/perf.md),
    # or, exported with padding="right", as its 1-D mask index (each row's key count, the contract of ONNX
    # Runtime's own optimized BERT), with which it runs cuDNN's fused attention. Written the way ONNX
    # Runtime's transformer optimizer writes BERT's attention.
    "qkv_attention": FusedOp(
        {"ort-cuda": frozenset({H, S}), "ort-cpu": frozenset({H, S})},
        torch.ops.mpcompiler.qkv_attention.default,
        _qkv_attention_onnx,
        (_SCHEMAS["Attention"],),
        opset=23,  # its mask's Cast, ReduceSum and Shape
    ),
    # RMSNorm as Llama-family models write it (fp32 statistics, x * rsqrt(mean(x^2) + eps) times a weight)
    # -> SimplifiedLayerNormalization, one kernel with fp32 statistics inside
    "rms_norm": FusedOp(
        {"ort-cuda": ALL, "ort-cpu": frozenset({H, S})},
        torch.ops.mpcompiler.rms_norm.default,
        _rms_norm_onnx,
        (_SCHEMAS["SimplifiedLayerNormalization"],),
        opset=23,
    ),
    # the residual add feeding an RMSNorm -> SkipSimplifiedLayerNormalization, which returns the sum too (a
    # pre-norm block's residual stream reads it again)
    "skip_rms_norm": FusedOp(
        {"ort-cuda": ALL, "ort-cpu": frozenset({H, S})},
        torch.ops.mpcompiler.skip_rms_norm.default,
        _skip_rms_norm_onnx,
        (_SCHEMAS["SkipSimplifiedLayerNormalization"],),
    ),
    # BERT's embeddings, layer_norm(word[ids] + position[0:S] [+ segment[...]]) with the positions 0..S-1
    # and the segments an input or all zeros -> EmbedLayerNormalization, one kernel for the three gathers,
    # the adds and the norm (all-zero segments: their one row folded into the position table)
    "embed_layer_norm": FusedOp(
        {"ort-cuda": frozenset({H, S}), "ort-cpu": frozenset({H, S})},
        torch.ops.mpcompiler.embed_layer_norm.default,
        _embed_layer_norm_onnx,
        (_SCHEMAS["EmbedLayerNormalization"],),
        opset=23,  # the ids' Cast: a model without attention to lower (DeBERTa's) is written at 23 for it
    ),
}

for _schema in {schema.name: schema for row in FUSED_OPS.values() for schema in row.schemas}.values():
    if not onnx.defs.has(_schema.name, _schema.domain):
        onnx.defs.register_schema(_schema)

# fused op -> target -> dtypes with a fused kernel there
KERNELS: dict[str, dict[str, frozenset[torch.dtype]]] = {name: row.kernels for name, row in FUSED_OPS.items()}

# ops whose ONNX translation is written with opset-23 ops (SDPA: ``Attention``; a Cast beside a contrib op);
# the contrib-op-only ones (SkipLayerNormalization, BiasGelu/FastGelu, SkipSimplifiedLayerNormalization) run
# at any opset
OPSET_23_OPS = frozenset(row.op for row in FUSED_OPS.values() if row.opset >= 23)


def has_kernel(op: str, target: str, dtype: torch.dtype | None) -> bool:
    """Whether ``target`` runs fused op ``op`` in ``dtype`` (None: a graph of several dtypes)."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; targets are {TARGETS}")
    dtypes = KERNELS[op].get(target, frozenset())
    return dtype in dtypes if dtype is not None else dtypes == ALL


def onnx_translations(opset: int) -> dict:
    """The custom translations torch.onnx.export takes at ``opset``: each custom op's, and an ATen op's
    (SDPA's) from the opset its translation needs on (below it, torch.onnx's own: ``Attention`` is
    opset 23's)."""
    return {
        row.op: row.onnx
        for row in FUSED_OPS.values()
        if row.onnx is not None and (row.op.namespace != "aten" or opset >= row.opset)
    }
