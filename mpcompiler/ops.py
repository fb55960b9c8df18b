"""The op table: which precision each ATen op may run in, and why.

Classes (see :class:`mpcompiler.ir.OpClass`):

- LOW: compute-bound ops whose speed comes from fp16/bf16 tensor cores and that accumulate in fp32.
- FOLLOW: elementwise and data-movement ops; running them in their inputs' dtype needs no casts.
- FP32: numerically fragile ops (torch.autocast's fp32 list: exp, pow, log, losses, norms, cumsum ...;
  and sin, cos, whose results hang on the absolute precision of their angle: rotary embeddings).
  A subset, ``FP32_INSIDE``, are kernels that already compute in fp32 when given fp16/bf16 tensors
  (torch's "opmath": layer_norm statistics, softmax, sum and mean accumulation), so they keep fp32
  math without cast islands; tests/test_ops.py checks that claim on the CPU kernels.
- FIXED: the program writes the dtype (``x.float()``, ``torch.ones(..., dtype=)``).

An op not in this table and not tagged pointwise by ATen runs in fp32: unknown means unsafe.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx

from mpcompiler.ir import OpClass, op_name


@dataclass(frozen=True)
class OpRule:
    op_class: OpClass
    fp32_inside: bool = False  # the kernel computes in fp32 on fp16/bf16 inputs (I/O may stay low)
    fp32_args: tuple[str, ...] = ()  # schema arguments kept fp32 whatever the I/O dtype
    # arguments whose values past the low dtype's range all mean the same (an additive attention mask:
    # -3.4e38 and -65504 both mask out); they are clamped to its range when cast, not a range problem
    saturating_args: tuple[str, ...] = ()
    why: str = ""


LOW_OPS = frozenset(
    """linear matmul mm bmm addmm addbmm baddbmm addmv mv dot vdot einsum bilinear tensordot
    conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d convolution _convolution
    scaled_dot_product_attention _scaled_dot_product_flash_attention
    _scaled_dot_product_efficient_attention _scaled_dot_product_cudnn_attention
    _scaled_dot_product_flash_attention_for_cpu""".split()
)

SATURATING = {"scaled_dot_product_attention": ("attn_mask",)}

# Batch norm in inference is an affine map with constant statistics; its kernels take fp16/bf16
# activations with fp32 parameters, and running_var near eps (1e-5) is subnormal in fp16.
_BN_PARAMS = ("weight", "bias", "running_mean", "running_var")
FP32_INSIDE = {
    **dict.fromkeys(
        """layer_norm native_layer_norm rms_norm _fused_rms_norm group_norm native_group_norm
        softmax _softmax log_softmax _log_softmax _safe_softmax sum mean
        avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d
        _adaptive_avg_pool2d""".split(),
        (),
    ),
    "batch_norm": _BN_PARAMS,
    "_native_batch_norm_legit_no_training": _BN_PARAMS,
}

FP32_OPS = frozenset(
    """exp exp2 expm1 log log10 log2 log1p pow reciprocal rsqrt acos asin cosh sinh tan sin cos erfinv
    softplus logsumexp logcumsumexp prod cumprod cumsum norm linalg_vector_norm linalg_norm
    frobenius_norm nuclear_norm renorm var std var_mean std_mean dist pdist cdist _cdist_forward
    cosine_similarity lgamma digamma polygamma
    nll_loss nll_loss2d nll_loss_nd cross_entropy_loss binary_cross_entropy
    binary_cross_entropy_with_logits kl_div l1_loss smooth_l1_loss huber_loss mse_loss
    poisson_nll_loss cosine_embedding_loss hinge_embedding_loss margin_ranking_loss
    multilabel_margin_loss soft_margin_loss triplet_margin_loss multi_margin_loss""".split()
)

# Data movement and selection: not tagged pointwise by ATen, but they only move or pick values.
FOLLOW_OPS = frozenset(
    """view _unsafe_view reshape view_as transpose t permute expand expand_as squeeze unsqueeze
    flatten unflatten slice select narrow split split_with_sizes tensor_split chunk unbind cat concat
    stack contiguous clone alias detach lift_fresh_copy index index_select gather take_along_dim
    embedding repeat repeat_interleave tile roll flip pad constant_pad_nd reflection_pad1d
    reflection_pad2d reflection_pad3d replication_pad1d replication_pad2d replication_pad3d
    pixel_shuffle pixel_unshuffle channel_shuffle native_channel_shuffle max_pool1d max_pool2d
    max_pool3d max_pool2d_with_indices max_pool3d_with_indices adaptive_max_pool1d
    adaptive_max_pool2d adaptive_max_pool3d upsample_nearest1d upsample_nearest2d
    upsample_nearest3d _upsample_nearest_exact1d _upsample_nearest_exact2d _upsample_nearest_exact3d
    upsample_bilinear2d upsample_linear1d upsample_bicubic2d upsample_trilinear3d masked_fill where
    tril triu diagonal movedim moveaxis swapaxes swapdims amax amin max min topk sort scatter
    scatter_add index_put index_add index_copy masked_scatter masked_select zeros_like ones_like
    full_like empty_like new_zeros new_ones new_full new_empty fill as_strided unfold to _to_copy
    dropout feature_dropout alpha_dropout""".split()
)

# Ops whose output holds exactly their input's values (calibration gives them their input's statistics).
SAME_VALUES = frozenset(
    """view _unsafe_view reshape view_as transpose t permute squeeze unsqueeze flatten unflatten
    contiguous clone alias detach expand""".split()
)

# Ops that convert dtype and nothing else when given a float dtype.
CAST_OPS = frozenset({"_to_copy", "to", "prims.convert_element_type"})


def bound_args(node: torch.fx.Node) -> dict[str, object]:
    """An ATen node's arguments by schema name (defaults left out); {} for other callables."""
    if not isinstance(node.target, torch._ops.OpOverload):
        return {}
    out = {}
    positional = [a for a in node.target._schema.arguments if not a.kwarg_only]
    for arg, value in zip(positional, node.args, strict=False):  # trailing defaults may be absent
        out[arg.name] = value
    out.update(node.kwargs)
    return out


def written_dtype(node: torch.fx.Node) -> torch.dtype | None:
    """The float dtype an op's ``dtype`` argument names, if the program wrote one."""
    value = bound_args(node).get("dtype")
    return value if isinstance(value, torch.dtype) and value.is_floating_point else None


def is_cast(node: torch.fx.Node) -> bool:
    """A node that changes dtype and nothing else (no device, layout or memory-format change)."""
    if node.op != "call_function" or op_name(node) not in CAST_OPS or written_dtype(node) is None:
        return False
    src = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else None
    if not isinstance(src, torch.Tensor):
        return False
    for name, value in bound_args(node).items():
        if name in ("self", "a", "dtype", "non_blocking", "copy", "pin_memory"):
            continue
        if name == "layout" and value in (None, torch.strided):
            continue
        if name == "memory_format" and value in (None, torch.preserve_format):
            continue
        if name == "device" and (value is None or torch.device(value) == src.device):
            continue
        return False
    return True


def rule_for(node: torch.fx.Node) -> OpRule:
    """The op class of a call_function node (whose output is a float value)."""
    name = op_name(node)
    if node.target is operator.getitem:
        return OpRule(OpClass.FOLLOW, why="picks an element of its input")
    if written_dtype(node) is not None:
        return OpRule(OpClass.FIXED, why="its dtype is written in the program")
    if name in LOW_OPS:
        return OpRule(OpClass.LOW, saturating_args=SATURATING.get(name, ()), why=f"compute-bound op ({name})")
    if name in FP32_INSIDE:
        return OpRule(
            OpClass.FP32,
            fp32_inside=True,
            fp32_args=FP32_INSIDE[name],
            why=f"{name} keeps fp32 math inside its kernel",
        )
    if name in FP32_OPS:
        return OpRule(OpClass.FP32, why=f"numerically fragile op ({name}): fp32 math")
    if name in FOLLOW_OPS:
        return OpRule(OpClass.FOLLOW, why=f"data movement ({name})")
    if isinstance(node.target, torch._ops.OpOverload) and torch.Tag.pointwise in node.target.tags:
        return OpRule(OpClass.FOLLOW, why=f"elementwise op ({name})")
    return OpRule(OpClass.FP32, why=f"no precision rule for op {name}: kept fp32 to be safe")


def positional_names(node: torch.fx.Node) -> list[str]:
    """Schema names of an ATen node's positional arguments ([] for other callables)."""
    if isinstance(node.target, torch._ops.OpOverload):
        return [a.name for a in node.target._schema.arguments if not a.kwarg_only]
    return []


def convert_inputs(node: torch.fx.Node, args: tuple, kwargs: dict, dtype: torch.dtype, convert) -> tuple[tuple, dict]:
    """``node``'s arguments, each passed through ``convert(value, want, saturate)``: ``want`` is
    ``dtype``, or fp32 for the op's ``fp32_args``; ``saturate`` marks its ``saturating_args``. The one
    place that says how a planned op reads its inputs (insert_casts realises it, the search simulates it)."""
    rule, names = rule_for(node), positional_names(node)

    def one(value, name: str | None):
        return convert(value, torch.float32 if name in rule.fp32_args else dtype, name in rule.saturating_args)

    return (
        tuple(one(a, names[i] if i < len(names) else None) for i, a in enumerate(args)),
        {k: one(v, k) for k, v in kwargs.items()},
    )
