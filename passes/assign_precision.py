"""assign_precision: decide each node's dtype, and record why.

In graph order, each float-valued op gets a dtype from its op class (see ``mpcompiler.ops``):

- ``keep_fp32`` (module-path prefixes or op names) wins over everything: fp32; then nodes the
  tolerance search (search_precision) promoted: fp32;
- LOW ops get the low dtype; FOLLOW ops and fp32-inside kernels take their inputs' dtype
  (promoted if mixed; the low dtype if their only float inputs are parameters, as in an embedding);
  FP32 ops get fp32; FIXED ops get the dtype the program writes;
- range rule: a node is never put in a low dtype if its output or any float input (parameters
  included) reaches past that dtype's max divided by ``margin`` on the calibration data. Casting
  such a value down would overflow at the cast itself. A value holding a constant its op fills with
  (:data:`WRITES_CONSTANTS`) past the dtype's max counts too, whether or not calibration made it fill.
- inside rule: nor if what it computes inside (``NodeRecord.inner``: a matmul's partial sums, a
  norm's squares) passes that limit, unless its kernel keeps that quantity in fp32 (``fp32_inside``;
  the reason then says so). cuBLAS may reduce fp16 matmuls in fp16
  (``torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction``), so a matmul's is not.
- zero rule: nor if the low dtype turns a nonzero into zero where that matters: a constant an
  elementwise op computes with (``clamp_min(norm, 1e-12)``, ``var + 1e-12``: an eps that guards a
  division; layer_norm's eps is applied in fp32 inside its kernel), or
  a divisor whose calibrated nonzero magnitudes reach that low (the divisor, the data movement
  between it and the division, and the division itself stay high). Swin-v2's ``F.normalize`` of a
  zero-padded window would otherwise divide 0 by 0.
- angle rule: nor if the value is an angle a sine or cosine reads (directly, or through data movement:
  a rotary embedding's positions times frequencies) and reaches past 1 (fp16; 1/8 for bf16), where the
  low dtype's rounding is past 5e-4 rad: at position 2047 fp16 rounds an angle by up to 1 rad.
- underflow rule: nor in fp16 if most of the magnitudes of its output or a float input sit below
  fp16's smallest normal (see :data:`UNDERFLOW_SHARE`).

With a ``fallback`` dtype (``dtype="auto"``: bf16, which has fp32's exponent range), a node these
rules keep out of the low dtype runs in the fallback instead, if the rules allow it there; else fp32.

Parameters are not decided here: insert_casts converts each to the dtype its consumers run in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.fx

from mpcompiler import dtypes
from mpcompiler.errors import OptionError
from mpcompiler.ir import (
    FP16_TINY,
    OpClass,
    Rule,
    float_dtype,
    graph_record,
    op_name,
    planned_dtype,
    record,
)
from mpcompiler.ops import SAME_VALUES, bound_args, rule_for, written_dtype
from mpcompiler.pass_manager import Pass, PassResult

RANGE_MARGIN = 2.0  # headroom over what calibration saw: held-out data may reach further
HEADROOM = 8  # a low-precision value past its dtype's max / 8 says so in its reason
# ops that may write a scalar argument into their output as it is (a fill value, a clamp bound), though the
# calibration data need not have made them write it
WRITES_CONSTANTS = frozenset(
    "masked_fill where fill full_like new_full index_fill constant_pad_nd pad clamp clamp_min clamp_max".split()
)

# Underflow rule: a value loses precision in fp16 when most of it sits below fp16's smallest normal
# (6.1e-5): subnormals are spaced 6e-8 apart whatever their size (a 1e-6 has 4 significant bits) and
# below 3e-8 they round to zero. Half of the nonzero values ("most") is the threshold: then the
# median magnitude is subnormal. Ordinary initialisations (std 0.02) have 0.2-0.5% there, but trained
# weights have more: all-MiniLM-L6-v2's layer-5 key bias has 11%, and loses nothing that matters in
# fp16 (a key bias shifts every score of a query alike); a 1e-6-scale weight has 100%.
UNDERFLOW_SHARE = 0.5
# ... unless the value's large magnitudes sit well inside the normal range: with its 99.99th percentile
# of |x| at 2^10 x fp16's smallest normal (0.0625) or more, the rounding of those values dwarfs the
# subnormal spacing, and the tiny ones count for little next to them in any sum (a softmax over a long
# sequence has most of its probabilities below 6.1e-5 and loses nothing in fp16).
UNDERFLOW_EXEMPT = 2.0**10 * FP16_TINY


def float_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    return [a for a in node.all_input_nodes if float_dtype(a.meta.get("val")) is not None]


def promote(kinds: list[torch.dtype]) -> torch.dtype:
    out = kinds[0]
    for d in kinds[1:]:
        out = torch.promote_types(out, d)
    return out


def problem(node: torch.fx.Node, dtype: torch.dtype, margin: float = RANGE_MARGIN) -> tuple[str, str] | None:
    """(rule, reason) of the range, inside, zero or underflow rule that keeps ``node`` out of ``dtype``;
    None if none does."""
    return AssignPrecision(dtype=dtype, margin=margin)._problem(node, dtype)


class AssignPrecision(Pass):
    """Give every float-valued node a dtype and a reason."""

    requires = ("ranges",)
    ensures = ("plan",)

    def __init__(
        self,
        *,
        dtype: torch.dtype,
        fallback: torch.dtype | None = None,
        keep_fp32: Sequence[str] = (),
        margin: float = RANGE_MARGIN,
    ):
        self.dtype, self.fallback, self.keep_fp32, self.margin = dtype, fallback, tuple(keep_fp32), margin

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        graph_record(gm).dtype = self.dtype
        graph_record(gm).fallback = self.fallback
        matched: set[str] = set()
        counts = {"low": 0, "high": 0} if self.fallback is None else {"low": 0, "fallback": 0, "high": 0}
        for node in gm.graph.nodes:
            rec = record(node)
            dtype = float_dtype(node.meta.get("val"))
            if node.op in ("placeholder", "get_attr"):
                rec.dtype = dtype
                rec.rule = Rule.MODEL_INPUT if node.op == "placeholder" else Rule.PARAMETER
                rec.reason = "as given" if node.op == "placeholder" else "converted to its consumers' dtype"
                continue
            if node.op != "call_function" or dtype is None:
                continue
            self._assign(node, dtype, matched)
            kind = {self.dtype: "low", self.fallback: "fallback"}.get(rec.dtype, "high")
            counts[kind] += 1
        unmatched = [k for k in self.keep_fp32 if k not in matched]
        if unmatched:
            raise OptionError(
                f"keep_fp32 entries {unmatched} match no module path or op in the captured graph; module "
                f"paths look like {_example_paths(gm)}, ops like 'softmax', 'linear'"
            )
        return PassResult(modified=True, stats=counts)

    def _keep(self, node: torch.fx.Node) -> str | None:
        path, name = record(node).module_path, op_name(node)
        for key in self.keep_fp32:
            if key == name or path == key or path.startswith(key + "."):
                return key
        return None

    def _assign(self, node: torch.fx.Node, captured: torch.dtype, matched: set[str]) -> None:
        rec = record(node)
        rule = rule_for(node)
        rec.op_class, rec.math_dtype = rule.op_class, None  # the search re-runs this pass: start afresh
        high = torch.promote_types(captured, torch.float32)  # fp32, or f64 where the model computes in f64
        key = self._keep(node)
        if key is not None:
            matched.add(key)
            rec.dtype, rec.rule, rec.reason = high, Rule.KEEP_FP32, f"keep_fp32 names {key!r}"
            return
        if rule.op_class is OpClass.FIXED:
            rec.dtype, rec.rule, rec.reason = written_dtype(node), "fixed", rule.why
            return
        if rec.promoted:
            rec.dtype, rec.rule, rec.reason = high, Rule.SENSITIVITY, rec.promoted
            return
        if rule.op_class is OpClass.FP32 and not rule.fp32_inside:
            rec.dtype, rec.rule, rec.reason = high, Rule.OP_CLASS, rule.why
            return
        if rule.op_class is OpClass.LOW:
            dtype, why = self.dtype, rule.why
        else:  # FOLLOW, or a kernel that keeps fp32 math inside on low-precision I/O
            acts = [a for a in float_inputs(node) if a.op != "get_attr"]
            if acts:
                dtype = promote([planned_dtype(a) for a in acts])
                why = f"follows its input{'s' if len(acts) > 1 else ''} ({dtypes.short(dtype)})"
            elif float_inputs(node):
                dtype, why = self.dtype, "its float inputs are parameters, converted once"
            else:
                dtype, why = captured, "creates its value; dtype as captured"
            if rule.op_class is OpClass.FP32:
                why = f"{rule.why}; I/O {why}"
        rec.dtype, rec.rule, rec.reason = (
            dtype,
            Rule.OP_CLASS if rule.op_class is not OpClass.FOLLOW else Rule.FOLLOWS_INPUTS,
            why,
        )
        if dtype in dtypes.LOW:
            problem = self._problem(node, dtype)
            if problem and self.fallback is not None and dtype != self.fallback:
                rule_name, why = problem
                second = self._problem(node, self.fallback)
                if second:
                    rec.dtype, (rec.rule, rec.reason) = high, second
                else:
                    rec.dtype, rec.rule, rec.reason = self.fallback, rule_name, f"{why}: {dtypes.short(self.fallback)}"
            elif problem:
                rec.dtype, (rec.rule, rec.reason) = high, problem
            elif rule.fp32_inside and self._inside_past(node, dtype):
                rec.reason += f"; {self._inside_past(node, dtype)}, computed in fp32 inside the kernel"
            top = torch.finfo(dtype).max
            if rec.dtype == dtype and rec.range is not None and rec.range.absmax > top / HEADROOM:
                peak = rec.range.absmax  # in range, but near enough to its edge to say so (an LLM's residual stream)
                rec.reason += f"; reaches {peak:.5g} on calibration data, {peak / top:.0%} of its max"
        rec.math_dtype = torch.float32 if rule.fp32_inside and rec.dtype != high else None

    def _problem(self, node: torch.fx.Node, dtype: torch.dtype) -> tuple[str, str] | None:
        """(rule, reason) of the first rule that keeps ``node`` out of ``dtype``; None if none does."""
        over = self._out_of_range(node, dtype)
        if over:
            return Rule.RANGE, over
        inside = self._inside_past(node, dtype)
        if inside and not rule_for(node).fp32_inside:
            return Rule.INSIDE, f"{inside}, and the kernel may keep it in {dtypes.short(dtype)}"
        zero = _zeroed(node, dtype)
        if zero:
            return Rule.ZERO, zero
        angle = _angle(node, dtype)
        if angle:
            return Rule.ANGLE, angle
        under = self._underflow(node, dtype)
        if under:
            return Rule.UNDERFLOW, under
        return None

    def _limit(self, dtype: torch.dtype) -> str:
        return f"past {dtypes.short(dtype)}'s max {torch.finfo(dtype).max:.6g} / margin {self.margin:g}"

    def _checked_values(self, node: torch.fx.Node) -> list[tuple[str, torch.fx.Node]]:
        """The node's output and the float inputs that are cast to its dtype: less arguments that saturate
        when cast (attention masks) and those its kernel takes in fp32 whatever its dtype (batch norm's)."""
        rule, args = rule_for(node), bound_args(node)
        spared = {args.get(name) for name in rule.saturating_args + rule.fp32_args}
        return [("output", node)] + [(f"input %{a.name}", a) for a in float_inputs(node) if a not in spared]

    def _out_of_range(self, node: torch.fx.Node, dtype: torch.dtype) -> str:
        """Why ``node`` cannot run in ``dtype`` on the calibrated ranges, or on a constant a value holds
        wherever its op fills ("" if it can)."""
        limit, top = torch.finfo(dtype).max / self.margin, torch.finfo(dtype).max
        for what, source in self._checked_values(node):
            r = record(source).range
            if r is not None and r.absmax > limit:
                return f"{what} reaches {r.absmax:.3g} on calibration data, {self._limit(dtype)}"
            fill = written_constant(source)
            if fill is not None and abs(fill) > top:
                return (
                    f"{what} holds the constant {float(fill):.6g} where it fills, past {dtypes.short(dtype)}'s max "
                    f"{top:.6g}"
                )
        return ""

    def _inside_past(self, node: torch.fx.Node, dtype: torch.dtype) -> str:
        """What ``node`` computes inside, if it passes ``dtype``'s max / margin ("" if it does not)."""
        inner = record(node).inner
        if inner is None or inner.absmax <= torch.finfo(dtype).max / self.margin:
            return ""
        return f"{inner.what}: peak {inner.absmax:.3g} on calibration data, {self._limit(dtype)}"

    def _underflow(self, node: torch.fx.Node, dtype: torch.dtype) -> str:
        """Why ``node`` loses its small values in ``dtype`` ("" if it does not). bf16's normal range is fp32's."""
        if dtype != torch.float16:
            return ""
        for what, source in self._checked_values(node):
            r = record(source).range
            if r is not None and r.subnormal_share > UNDERFLOW_SHARE and r.p9999 < UNDERFLOW_EXEMPT:
                return (
                    f"{what}: {r.subnormal_share:.0%} of its nonzero values on calibration data are below "
                    f"f16's smallest normal {FP16_TINY:.2g} (subnormal or zero in f16; share > {UNDERFLOW_SHARE:.0%})"
                )
        return ""


def written_constant(node: torch.fx.Node) -> float | None:
    """The finite constant of the largest magnitude that ``node``'s value holds wherever its op (or the op it
    is a view of) fills, whether or not calibration made it fill: HF's ``masked_fill(scores, ~mask,
    finfo(float32).min)`` calibrated on unpadded samples, past fp16's and bf16's range (in fp16, masked_fill
    refuses it and where writes -inf, which a fully masked row's softmax turns into NaN). None if none."""
    while op_name(node) in SAME_VALUES and isinstance(node.args[0], torch.fx.Node):
        node = node.args[0]
    if op_name(node) not in WRITES_CONSTANTS:
        return None
    values = (*node.args, *node.kwargs.values())  # an int too: masked_fill(~mask, -10**9)
    numbers = [v for v in values if type(v) in (int, float) and math.isfinite(v)]
    return max(numbers, key=abs, default=None)


def _is_zero_in(value: float, dtype: torch.dtype) -> bool:
    return value != 0 and math.isfinite(value) and torch.tensor(value).to(dtype).item() == 0


def _reads(node: torch.fx.Node, ops: tuple[str, ...], arg: int) -> torch.fx.Node | None:
    """The op among ``ops`` that reads ``node``'s value as its argument ``arg``, directly or through data
    movement (expand, cat): a division's divisor, a sine's angle."""
    for user in node.users:
        if op_name(user) in ops and len(user.args) > arg and user.args[arg] is node:
            return user
        if (op_name(user) in SAME_VALUES and user.args[0] is node) or (op_name(user) == "cat" and node in user.args[0]):
            reader = _reads(user, ops, arg)
            if reader is not None:
                return reader
    return None


def _divides(node: torch.fx.Node) -> torch.fx.Node | None:
    return _reads(node, ("div",), 1)


def _zeroed(node: torch.fx.Node, dtype: torch.dtype) -> str:
    """Why ``dtype`` would turn a nonzero into a zero that matters at ``node`` ("" if it would not)."""
    low = dtypes.short(dtype)
    elementwise = rule_for(node).op_class is OpClass.FOLLOW  # other kernels take constants in fp32 math
    for value in (*node.args, *node.kwargs.values()) if elementwise else ():
        if isinstance(value, float) and _is_zero_in(value, dtype):
            return f"its constant {value:g} is 0 in {low} (an eps guarding a division would be lost)"
    divisor = node.args[1] if op_name(node) == "div" and len(node.args) > 1 else node if _divides(node) else None
    r = record(divisor).range if isinstance(divisor, torch.fx.Node) else None
    if r is not None and _is_zero_in(r.absmin, dtype):
        div = node if divisor is not node else _divides(node)
        return (
            f"%{div.name} divides by %{divisor.name}, whose nonzero values reach {r.absmin:.2g} on "
            f"calibration data: 0 in {low}"
        )
    return ""


def _angle(node: torch.fx.Node, dtype: torch.dtype) -> str:
    """Why ``node``'s value, an angle a sine or cosine reads, cannot be rounded to ``dtype`` ("" if it can).
    A rotary embedding's angles are positions times frequencies: at position 2047, fp16 rounds the angle
    by up to 1 rad. The low dtype may hold an angle up to 1 in magnitude (fp16's rounding there is 5e-4)."""
    periodic = _reads(node, ("sin", "cos"), 0)
    r = record(node).range
    limit = torch.finfo(torch.float16).eps / torch.finfo(dtype).eps  # fp16: 1; bf16: 1/8 (its rounding there)
    if periodic is None or r is None or r.absmax <= limit:
        return ""
    step = r.absmax * torch.finfo(dtype).eps / 2
    return (
        f"%{periodic.name} ({op_name(periodic)}) reads it as an angle, up to {r.absmax:.4g} on calibration data: "
        f"{dtypes.short(dtype)} would round it by up to {step:.2g}"
    )


def _example_paths(gm: torch.fx.GraphModule) -> list[str]:
    paths = sorted({record(n).module_path for n in gm.graph.nodes if record(n).module_path})
    return paths[:3]
