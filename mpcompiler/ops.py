"""The op table: what mpcompiler knows about each ATen op, one row per op (:data:`OPS`).

A row (:class:`OpRule`) gives the op's class (see :class:`mpcompiler.ir.OpClass`), which decides its dtype:

- LOW: compute-bound ops whose speed comes from fp16/bf16 tensor cores and that accumulate in fp32.
- FOLLOW: data movement and selection; running them in their inputs' dtype needs no casts. Elementwise
  ops are FOLLOW by ATen's ``pointwise`` tag and need no row.
- FP32: numerically fragile ops (torch.autocast's fp32 list: exp, pow, log, losses, norms, cumsum ...;
  and sin, cos, whose results hang on the absolute precision of their angle: rotary embeddings).
  With ``fp32_inside``: kernels that already compute in fp32 when given fp16/bf16 tensors (torch's
  "opmath": layer_norm statistics, softmax, sum and mean accumulation), so they keep fp32 math without
  cast islands; tests/test_ops.py checks that claim on the CPU kernels.
- FIXED: the program writes the dtype (``x.float()``, ``torch.ones(..., dtype=)``); any op with a float
  ``dtype`` argument, whatever its row.

It also says the rest passes need to know of the op: arguments kept fp32 or clamped when cast, whether
its output holds its input's values or it only converts dtype, and what it computes inside its kernel
(``inside``), which calibrate_ranges measures on every sample. LOW ops and fp32-inside kernels run with
low-precision I/O, so each has an ``inside`` rule or says why it has none; tests/test_ops.py fails otherwise.

Adding an op is adding its row. An op without a row and not tagged pointwise by ATen runs in fp32:
unknown means unsafe.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx

from mpcompiler.ir import OpClass, op_name

# An inside rule: the op's arguments by schema name -> (peak, what it is), or None where the arguments
# leave nothing to measure (an inference batch norm).
Measure = Callable[[dict], tuple[float, str] | None]


@dataclass(frozen=True)
class OpRule:
    """What mpcompiler knows about an op: a row of :data:`OPS`, or what :func:`rule_for` says of a node
    the table does not decide (an elementwise op, a dtype written in the program)."""

    op_class: OpClass
    fp32_inside: bool = False  # the kernel computes in fp32 on fp16/bf16 inputs (I/O may stay low)
    fp32_args: tuple[str, ...] = ()  # schema arguments kept fp32 whatever the I/O dtype
    # arguments whose values past the low dtype's range all mean the same (an additive attention mask:
    # -3.4e38 and -65504 both mask out); they are clamped to its range when cast, not a range problem
    saturating_args: tuple[str, ...] = ()
    same_values: bool = False  # its output holds exactly its input's values: calibration copies their statistics
    cast: bool = False  # given a float dtype, it converts dtype and nothing else
    # what the kernel computes on the way that can pass the range its I/O stays in (a matmul's partial
    # sums, a norm's squares): the Measure calibrate_ranges runs on each sample's arguments, or why
    # there is none (a string)
    inside: Measure | str | None = None
    why: str = ""  # the reason a node planned by this rule gives


# ---- inside rules: the peak of what an op computes inside its kernel, from its actual arguments


def _dims(x: torch.Tensor, dim) -> tuple[int, ...]:
    """A reduction's dims, non-negative; None or [] means all."""
    if dim is None or (isinstance(dim, (list, tuple)) and not dim):
        return tuple(range(x.dim()))
    return tuple(d % max(x.dim(), 1) for d in ([dim] if isinstance(dim, int) else dim))


def _count(x: torch.Tensor, dims: tuple[int, ...]) -> int:
    return math.prod(x.shape[d] for d in dims) if x.dim() else 1


def _squared_deviations(x: torch.Tensor, dims: tuple[int, ...]) -> tuple[float, str]:
    # the largest square is the square of the largest deviation: no squares are formed here
    dev = (x - x.mean(dims, keepdim=True)).abs().amax()
    return float(dev) ** 2, f"squared deviations over {_count(x, dims)} elements"


def _squares(x: torch.Tensor, dims: tuple[int, ...]) -> tuple[float, str]:
    return float(x.abs().amax()) ** 2, f"squares over {_count(x, dims)} elements"


def _running_sum(x: torch.Tensor, dims: tuple[int, ...]) -> tuple[float, str]:
    if len(dims) == 1:  # one reduced dim: the partial sums in order, exactly
        peak = x.cumsum(dims[0]).abs().amax()
    else:  # several: a kernel may add in any order; every partial sum is bounded by the sum of |x|
        peak = x.abs().sum(dims).amax()
    return float(peak), f"running sum over {_count(x, dims)} elements"


def _accumulation(a: torch.Tensor, b: torch.Tensor, alpha=1) -> tuple[float, str]:
    # |A| @ |B| bounds every partial sum of A @ B, in whatever order the kernel adds
    peak = torch.matmul(a.abs(), b.abs()).amax() * abs(alpha)
    return float(peak), f"accumulation over K={a.shape[-1]}"


def _batch_accumulation(a: torch.Tensor, b: torch.Tensor, alpha=1) -> tuple[float, str]:
    # addbmm sums the batch's products too: |A| @ |B| summed over the batch bounds every partial sum
    peak = torch.matmul(a.abs(), b.abs()).sum(0).amax() * abs(alpha)
    return float(peak), f"accumulation over K={a.shape[0]}x{a.shape[-1]}"


def _last_dims_deviations(x: torch.Tensor, normalized_shape) -> tuple[float, str]:
    return _squared_deviations(x, tuple(range(x.dim() - len(normalized_shape), x.dim())))


def _group_deviations(x: torch.Tensor, groups: int) -> tuple[float, str]:
    return _squared_deviations(x.reshape(x.shape[0], groups, -1), (2,))


def _vector_norm(x: torch.Tensor, p, dim) -> tuple[float, str] | None:
    # only the 2-norm squares its input; other orders are left unmeasured
    return _squares(x, _dims(x, dim)) if p in (None, 2, 2.0) else None


def _batch_norm(x: torch.Tensor, training: bool) -> tuple[float, str] | None:
    # inference batch norm uses stored statistics: nothing is squared inside
    return _squared_deviations(x, (0, *range(2, x.dim()))) if training else None


# ---- the table

_WHY = {  # (class, fp32_inside) -> a row's reason, {} its op's name
    (OpClass.LOW, False): "compute-bound op ({})",
    (OpClass.FP32, True): "{} keeps fp32 math inside its kernel",
    (OpClass.FP32, False): "numerically fragile op ({}): fp32 math",
    (OpClass.FOLLOW, False): "data movement ({})",
    (OpClass.FIXED, False): "its dtype is written in the program",
}


def _rows(names: str, op_class: OpClass, **facts) -> dict[str, OpRule]:
    """One row per op in ``names`` (space-separated), each with these facts."""
    why = _WHY[op_class, facts.get("fp32_inside", False)]
    return {name: OpRule(op_class, why=why.format(name), **facts) for name in names.split()}


def _table(*groups: dict[str, OpRule]) -> dict[str, OpRule]:
    """The groups' rows as one table: an op in two groups would have two rows that can disagree."""
    table: dict[str, OpRule] = {}
    for group in groups:
        if table.keys() & group.keys():
            raise ValueError(f"ops with two rows in the op table: {sorted(table.keys() & group.keys())}")
        table |= group
    return table


_LATER = "not measured (the contraction's |A| x |B| would bound it, as for mm; left for later)"
_ATTENTION = "not measured: its matmuls are inside one kernel"
_SOFTMAX = "not measured: exp(x - max) <= 1, so its sum is at most the count, and the kernel sums in fp32"
_POOL = "not measured: the kernel sums each window in fp32"
# Batch norm in inference is an affine map with constant statistics; its kernels take fp16/bf16
# activations with fp32 parameters, and running_var near eps (1e-5) is subnormal in fp16.
_BN_PARAMS = ("weight", "bias", "running_mean", "running_var")

OPS: dict[str, OpRule] = _table(
    # LOW; inside: the accumulation's partial sums
    _rows("linear", OpClass.LOW, inside=lambda a: _accumulation(a["input"], a["weight"].t())),
    _rows("matmul", OpClass.LOW, inside=lambda a: _accumulation(a["self"], a["other"])),
    _rows("mm bmm", OpClass.LOW, inside=lambda a: _accumulation(a["self"], a["mat2"])),
    _rows("addmm", OpClass.LOW, inside=lambda a: _accumulation(a["mat1"], a["mat2"], a.get("alpha", 1))),
    _rows("baddbmm", OpClass.LOW, inside=lambda a: _accumulation(a["batch1"], a["batch2"], a.get("alpha", 1))),
    _rows("mv", OpClass.LOW, inside=lambda a: _accumulation(a["self"], a["vec"])),
    _rows("addmv", OpClass.LOW, inside=lambda a: _accumulation(a["mat"], a["vec"], a.get("alpha", 1))),
    _rows("dot", OpClass.LOW, inside=lambda a: _accumulation(a["self"], a["tensor"])),
    _rows("vdot", OpClass.LOW, inside=lambda a: _accumulation(a["self"], a["other"])),
    _rows("addbmm", OpClass.LOW, inside=lambda a: _batch_accumulation(a["batch1"], a["batch2"], a.get("alpha", 1))),
    _rows("einsum bilinear tensordot", OpClass.LOW, inside=_LATER),
    _rows(
        "conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d convolution _convolution",
        OpClass.LOW,
        inside="not measured: |x| * |w| would be a second convolution per sample, doubling calibration's cost",
    ),
    _rows("scaled_dot_product_attention", OpClass.LOW, saturating_args=("attn_mask",), inside=_ATTENTION),
    _rows(
        """_scaled_dot_product_flash_attention _scaled_dot_product_efficient_attention
        _scaled_dot_product_cudnn_attention _scaled_dot_product_flash_attention_for_cpu""",
        OpClass.LOW,
        inside=_ATTENTION,
    ),
    # FP32 with fp32 math inside the kernel, I/O in the inputs' dtype
    _rows(
        "layer_norm native_layer_norm",
        OpClass.FP32,
        fp32_inside=True,
        inside=lambda a: _last_dims_deviations(a["input"], a["normalized_shape"]),
    ),
    _rows(
        "rms_norm _fused_rms_norm",
        OpClass.FP32,
        fp32_inside=True,
        inside=lambda a: _squares(a["input"], tuple(range(-len(a["normalized_shape"]), 0))),
    ),
    _rows(
        "group_norm", OpClass.FP32, fp32_inside=True, inside=lambda a: _group_deviations(a["input"], a["num_groups"])
    ),
    _rows(
        "native_group_norm", OpClass.FP32, fp32_inside=True, inside=lambda a: _group_deviations(a["input"], a["group"])
    ),
    _rows(
        "batch_norm",
        OpClass.FP32,
        fp32_inside=True,
        fp32_args=_BN_PARAMS,
        inside=lambda a: _batch_norm(a["input"], a.get("training", False)),
    ),
    _rows(
        "_native_batch_norm_legit_no_training",
        OpClass.FP32,
        fp32_inside=True,
        fp32_args=_BN_PARAMS,
        inside="not measured: the inference form, stored statistics: nothing is squared inside",
    ),
    _rows("softmax _softmax log_softmax _log_softmax _safe_softmax", OpClass.FP32, fp32_inside=True, inside=_SOFTMAX),
    _rows(
        "sum mean",
        OpClass.FP32,
        fp32_inside=True,
        inside=lambda a: _running_sum(a["self"], _dims(a["self"], a.get("dim"))),
    ),
    _rows(
        """avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d
        _adaptive_avg_pool2d""",
        OpClass.FP32,
        fp32_inside=True,
        inside=_POOL,
    ),
    # FP32, with casts around them; inside rules only inform the report (the op computes in fp32)
    _rows(
        "var std var_mean std_mean",
        OpClass.FP32,
        inside=lambda a: _squared_deviations(a["self"], _dims(a["self"], a.get("dim"))),
    ),
    _rows("linalg_vector_norm", OpClass.FP32, inside=lambda a: _vector_norm(a["self"], a.get("ord"), a.get("dim"))),
    _rows("norm", OpClass.FP32, inside=lambda a: _vector_norm(a["self"], a.get("p"), a.get("dim"))),
    _rows("cumsum", OpClass.FP32, inside=lambda a: _running_sum(a["self"], _dims(a["self"], a["dim"]))),
    _rows(
        """exp exp2 expm1 log log10 log2 log1p pow reciprocal rsqrt acos asin cosh sinh tan sin cos erfinv
        softplus logsumexp logcumsumexp prod cumprod linalg_norm frobenius_norm nuclear_norm renorm dist pdist
        cdist _cdist_forward cosine_similarity lgamma digamma polygamma""",
        OpClass.FP32,
    ),
    _rows(
        """nll_loss nll_loss2d nll_loss_nd cross_entropy_loss binary_cross_entropy
        binary_cross_entropy_with_logits kl_div l1_loss smooth_l1_loss huber_loss mse_loss
        poisson_nll_loss cosine_embedding_loss hinge_embedding_loss margin_ranking_loss
        multilabel_margin_loss soft_margin_loss triplet_margin_loss multi_margin_loss""",
        OpClass.FP32,
    ),
    # FOLLOW: data movement and selection (not tagged pointwise by ATen, but they only move or pick values)
    _rows(
        """view _unsafe_view reshape view_as transpose t permute squeeze unsqueeze flatten unflatten
        contiguous clone alias detach expand""",
        OpClass.FOLLOW,
        same_values=True,
    ),
    _rows("_to_copy to", OpClass.FOLLOW, cast=True),
    _rows(
        """expand_as slice select narrow split split_with_sizes tensor_split chunk unbind cat concat
        stack lift_fresh_copy index index_select gather take_along_dim
        embedding repeat repeat_interleave tile roll flip pad constant_pad_nd reflection_pad1d
        reflection_pad2d reflection_pad3d replication_pad1d replication_pad2d replication_pad3d
        pixel_shuffle pixel_unshuffle channel_shuffle native_channel_shuffle max_pool1d max_pool2d
        max_pool3d max_pool2d_with_indices max_pool3d_with_indices adaptive_max_pool1d
        adaptive_max_pool2d adaptive_max_pool3d upsample_nearest1d upsample_nearest2d
        upsample_nearest3d _upsample_nearest_exact1d _upsample_nearest_exact2d _upsample_nearest_exact3d
        upsample_bilinear2d upsample_linear1d upsample_bicubic2d upsample_trilinear3d masked_fill where
        tril triu diagonal movedim moveaxis swapaxes swapdims amax amin max min topk sort scatter
        scatter_add index_put index_add index_copy masked_scatter masked_select zeros_like ones_like
        full_like empty_like new_zeros new_ones new_full new_empty fill as_strided unfold
        dropout feature_dropout alpha_dropout""",
        OpClass.FOLLOW,
    ),
    # FIXED: a conversion whose dtype is always written
    _rows("prims.convert_element_type", OpClass.FIXED, cast=True),
)

# Views of the table for passes that test op names.
FOLLOW_OPS = frozenset(name for name, rule in OPS.items() if rule.op_class is OpClass.FOLLOW)
SAME_VALUES = frozenset(name for name, rule in OPS.items() if rule.same_values)


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
    row = OPS.get(op_name(node))
    if node.op != "call_function" or row is None or not row.cast or written_dtype(node) is None:
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
    """The rule of a call_function node (whose output is a float value): its op's row, unless the
    program writes its dtype."""
    name = op_name(node)
    if node.target is operator.getitem:
        return OpRule(OpClass.FOLLOW, why="picks an element of its input")
    if written_dtype(node) is not None:
        return OpRule(OpClass.FIXED, why=_WHY[OpClass.FIXED, False])
    if name in OPS:
        return OPS[name]
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


def inner_peak(node: torch.fx.Node, args: tuple, kwargs: dict) -> tuple[float, str] | None:
    """The peak of what ``node``'s op computes inside (its row's ``inside``), on these argument values
    (None: not measured)."""
    measure = getattr(OPS.get(op_name(node)), "inside", None)
    if not callable(measure):
        return None
    bound = dict(zip(positional_names(node), args, strict=False))
    bound.update(kwargs)
    x = bound.get("input", bound.get("self", bound.get("mat1", bound.get("batch1"))))
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.numel() == 0:
        return None
    return measure(bound)
