"""The IR: the FX graph of the exported program, plus one typed record per node.

Every node carries a :class:`NodeRecord` under ``node.meta["mpcompiler"]`` and the graph module a
:class:`GraphRecord` under ``gm.meta["mpcompiler"]``. Passes read and write these records; nothing
else in ``meta`` belongs to mpcompiler.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field

import torch
import torch.fx

META_KEY = "mpcompiler"

FP16_TINY = float(torch.finfo(torch.float16).tiny)  # fp16's smallest normal number


class OpClass(str, enum.Enum):
    """What an op's precision depends on."""

    LOW = "low"  # compute-bound (matmul, conv, attention): runs in the target dtype
    FOLLOW = "follow"  # elementwise and data movement: runs in the dtype of its inputs
    FP32 = "fp32"  # numerically fragile: needs fp32 math (in the kernel, or by casting around it)
    FIXED = "fixed"  # its dtype is written in the program (a user's cast, a factory with dtype=)


class Rule(str, enum.Enum):
    """Which rule decided a node's dtype (``NodeRecord.rule``); the value is what dumps and reports print."""

    NONE = ""
    MODEL_INPUT = "model input"
    PARAMETER = "parameter"  # a weight, converted once to its consumers' dtype
    OP_CLASS = "op class"  # ops.rule_for's class: low, fp32 or a dtype written in the program
    FOLLOWS_INPUTS = "follows inputs"
    KEEP_FP32 = "keep_fp32"  # compile(keep_fp32=...) names it
    SENSITIVITY = "sensitivity"  # the tolerance search keeps it high
    # the rules that keep a node out of a low dtype (assign_precision's range, inside, zero, angle, underflow)
    RANGE = "range"
    INSIDE = "inside"
    ZERO = "zero"
    ANGLE = "angle"
    UNDERFLOW = "underflow"
    PLACEMENT = "placement"  # place_casts moved it to the side of the cut that casts fewer bytes
    CAST = "cast"  # a cast mpcompiler inserted
    CLAMP = "clamp"  # an inserted clamp to a low dtype's range before a saturating cast (an additive mask)
    KV_CACHE = "kv cache"  # insert_kv_cache's slot bookkeeping
    DECODE_ATTENTION = "decode attention"  # a decode graph's attention, rewritten for one new token
    DECODE_ACTIVATION = "decode activation"  # a 1-row decode graph's MLP activation, stored once
    DECODE_STATE = "decode state"  # a greedy decode graph's token choice and the inputs it writes for its next replay
    PROMPT_STEP = "prompt step"  # an unpadded prompt's step: keys repeated for causal attention, the last logits

    def __str__(self) -> str:
        return self.value


# the rules whose reason a dump prints: why a node is not in the low dtype
KEPT_HIGH = frozenset({Rule.KEEP_FP32, Rule.SENSITIVITY, Rule.RANGE, Rule.INSIDE, Rule.ZERO, Rule.ANGLE,
                       Rule.UNDERFLOW, Rule.PLACEMENT})  # fmt: skip


@dataclass(frozen=True)
class RangeStats:
    """What calibration saw of one value, over all samples (finite values only in min/max/absmax)."""

    min: float
    max: float
    absmax: float
    p9999: float  # 99.99th percentile of |x|
    nan: int  # NaN elements seen
    inf: int  # +-inf elements seen
    subnormal_share: float  # share of nonzero finite values below fp16's smallest normal (6.1e-5)
    samples: int
    absmin: float = 0.0  # the smallest nonzero finite |x| (0.0 if there is none)

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def clamped(self, limit: float) -> RangeStats:
        """The range of the value clamped to [-limit, limit] (an additive mask cast to fp16 saturates)."""
        return dataclasses.replace(
            self,
            min=max(self.min, -limit),
            max=min(self.max, limit),
            absmax=min(self.absmax, limit),
            p9999=min(self.p9999, limit),
            inf=0,
        )


@dataclass(frozen=True)
class InnerRange:
    """The peak magnitude of a quantity an op computes inside its kernel, over all calibration samples.

    An op's inputs and output can sit well inside fp16's range while what it computes on the way
    does not: the squared deviations of a layer_norm, the running sum of a long mean, the partial
    sums of a matmul. ``what`` names the quantity ("squared deviations over 768 elements").
    """

    absmax: float
    what: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Fp8Scales:
    """A linear's e4m3 inputs (``compile(dtype="fp8")``, :mod:`mpcompiler.fp8`): x / x_scale and w / w_scale in
    float8_e4m3fn, static per-tensor scales from the calibrated absmax of each."""

    x_scale: float
    w_scale: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class NodeRecord:
    """mpcompiler's facts and decisions for one FX node."""

    module_path: str = ""  # innermost module that produced the node ("" for graph-level code)
    op_class: OpClass | None = None  # None: not a float value, or not an op (inputs, params)
    dtype: torch.dtype | None = None  # planned dtype of the node's float value; None if it has none
    math_dtype: torch.dtype | None = None  # where the kernel computes wider than its I/O (layer_norm)
    rule: Rule = Rule.NONE  # which rule decided dtype
    reason: str = ""  # the decision in words, for dumps and the report
    range: RangeStats | None = None
    inner: InnerRange | None = None  # peak of what the op computes inside (norms, reductions, matmuls)
    inserted: bool = False  # mpcompiler added the node (a cast, a clamp): the model did not write it
    fused: str = ""  # the rewrite that made this node, if lower_fused did ("eager attention -> ...")
    # set by search_precision (compile(tolerance=...)):
    sensitivity: float | None = None  # first-order rel. L2 error at the outputs if only this node is low
    local_error: float | None = None  # rel. L2 error of this node's own output in low precision on fp32 inputs
    flops: int | None = None  # matmul/conv/attention FLOPs per call, on the calibration samples
    promoted: str = ""  # why the search keeps this node high ("" if it does not)
    # compile(dtype="fp8"), a linear's level below its dtype: set by assign_fp8
    fp8: Fp8Scales | None = None  # its GEMM reads e4m3 inputs with these scales
    fp8_reason: str = ""  # why it does, or why a linear in a low dtype does not
    fp8_promoted: str = ""  # why the search keeps it out of fp8 ("" if it does not)
    fp8_saturated: float | None = None  # share of its input's held-out values past x_scale's range (compile())


@dataclass
class SearchLog:
    """What search_precision did: the tolerance, its cost and the plans it evaluated."""

    tolerance: float
    metric: str
    candidates: int = 0  # low-precision ops that compute (not views), ranked by sensitivity
    kept_high: int = 0  # how many of the most sensitive the plan keeps high
    sensitivity_passes: int = 0  # forward + backward passes spent estimating sensitivity
    evaluations: list[tuple[int, float]] = field(default_factory=list)  # (k kept high, metric on held-out)
    wall_s: float = 0.0
    # compile(dtype="fp8"): the first stage, e4m3 linears kept in the low dtype, most sensitive first
    fp8_candidates: int = 0
    fp8_kept: int = 0
    fp8_kept_with: int = 0  # and kept out of fp8 with one of them: a linear of its input (their one GEMM)
    fp8_evaluations: list[tuple[int, float]] = field(default_factory=list)  # (k kept out of fp8, metric)

    def to_dict(self) -> dict:
        return {**self.__dict__, "evaluations": [list(e) for e in self.evaluations],
                "fp8_evaluations": [list(e) for e in self.fp8_evaluations]}  # fmt: skip


@dataclass
class GraphRecord:
    """mpcompiler's facts for the whole graph."""

    dtype: torch.dtype  # the low-precision dtype asked for
    fallback: torch.dtype | None = None  # dtype="auto": bf16 where the target's range is too small
    fp8: bool = False  # dtype="fp8": linears may read e4m3 inputs (NodeRecord.fp8), the rest as ``dtype``
    dynamic_shapes: dict | None = None  # torch.export's spec at capture, by forward() argument name
    dynamic_dims: dict[str, list[int]] = field(default_factory=dict)  # dims past the batch's, as capture's dynamic=
    output_dtypes: tuple[torch.dtype | None, ...] = ()  # the model's own output dtypes, kept at emit
    calib_samples: int = 0
    casts_inserted: bool = False  # after insert_casts, each planned dtype must equal the node's dtype
    search: SearchLog | None = None  # set when compile() was given a tolerance
    cache_slots: int | None = None  # a generation program's KV cache slots (max_seq), set by insert_kv_cache


def record(node: torch.fx.Node) -> NodeRecord:
    """The node's record, created empty on first use (capture gives every node one)."""
    rec = node.meta.get(META_KEY)
    if rec is None:
        rec = node.meta[META_KEY] = NodeRecord(module_path=module_path(node))
    return rec


def derived(rec: NodeRecord, **changes) -> NodeRecord:
    """The record of a node a rewrite makes in place of ``rec``'s: the same facts, but not one mpcompiler
    inserted beside the model's ops (a cast or clamp it replaces is no longer one)."""
    rule = Rule.NONE if rec.rule in (Rule.CAST, Rule.CLAMP) else rec.rule
    return dataclasses.replace(rec, **({"inserted": False, "rule": rule} | changes))


def graph_record(gm: torch.fx.GraphModule) -> GraphRecord:
    return gm.meta[META_KEY]


def attr_of(gm: torch.nn.Module, target: str):
    """The attribute a get_attr node names (``encoder.layer.0.attention.self.query.weight``)."""
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner), name)


def replace_attr(owner: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    """``owner.name`` replaced by ``value`` in the same kind of slot: a frozen parameter, a buffer, or a plain
    attribute (a constant torch.export lifted)."""
    if name in owner._parameters:
        owner._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
    elif name in owner._buffers:
        owner._buffers[name] = value
    else:
        setattr(owner, name, value)


def module_path(node: torch.fx.Node) -> str:
    """Innermost module path from torch.export's ``nn_module_stack`` (``encoder.layer.0.attention``)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    # torch.export marks nodes it made outside any module (sizes of dynamic dims) with a hook's name
    return path if isinstance(path, str) and not path.startswith("_empty_nn_module_stack") else ""


def value_of(node: torch.fx.Node):
    """The node's (fake) value from the last shape propagation."""
    return node.meta.get("val")


def float_dtype(val) -> torch.dtype | None:
    """The floating dtype of a value: a tensor's, or the first float tensor's in a tuple/list."""
    if isinstance(val, torch.Tensor):
        return val.dtype if val.dtype.is_floating_point else None
    if isinstance(val, (tuple, list)):
        for v in val:
            d = float_dtype(v)
            if d is not None:
                return d
    return None


def planned_dtype(node: torch.fx.Node) -> torch.dtype | None:
    """The dtype a node's float value has under the plan (its record), else as captured."""
    rec = node.meta.get(META_KEY)
    if rec is not None and rec.dtype is not None:
        return rec.dtype
    return float_dtype(value_of(node))


def op_name(node: torch.fx.Node) -> str:
    """Short op name: ``linear`` for aten.linear.default, ``getitem`` for operator.getitem."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        ns, name = target._schema.name.split("::", 1)
        return name if ns == "aten" else f"{ns}.{name}"
    if node.op == "call_function":
        return getattr(target, "__name__", str(target))
    return str(target)
