"""assign_precision: decide each node's dtype, and record why.

In graph order, each float-valued op gets a dtype from its op class (see ``mpcompiler.ops``):

- ``keep_fp32`` (module-path prefixes or op names) wins over everything: fp32;
- LOW ops get the target dtype; FOLLOW ops and fp32-inside kernels take their inputs' dtype
  (promoted if mixed; the target if their only float inputs are parameters, as in an embedding);
  FP32 ops get fp32; FIXED ops get the dtype the program writes;
- range rule: a node is never put in a low dtype if its output or any float input (parameters
  included) reaches past that dtype's max divided by ``margin`` on the calibration data. Casting
  such a value down would overflow at the cast itself.

Parameters are not decided here: insert_casts converts each to the dtype its consumers run in.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx

from mpcompiler.errors import OptionError
from mpcompiler.ir import OpClass, float_dtype, graph_record, op_name, planned_dtype, record, short_dtype
from mpcompiler.ops import bound_args, rule_for, written_dtype
from mpcompiler.pass_manager import Pass, PassResult

RANGE_MARGIN = 2.0  # headroom over what calibration saw: held-out data may reach further


def float_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    return [a for a in node.all_input_nodes if float_dtype(a.meta.get("val")) is not None]


def promote(dtypes: list[torch.dtype]) -> torch.dtype:
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


def out_of_range(node: torch.fx.Node, dtype: torch.dtype, margin: float = RANGE_MARGIN) -> str:
    """Why ``node`` cannot run in ``dtype`` on the calibrated ranges ("" if it can)."""
    limit = torch.finfo(dtype).max / margin
    saturating = {bound_args(node).get(name) for name in rule_for(node).saturating_args}
    inputs = [(f"input %{a.name}", a) for a in float_inputs(node) if a not in saturating]
    for what, source in [("output", node), *inputs]:
        r = record(source).range
        if r is not None and r.absmax > limit:
            return (
                f"{what} reaches {r.absmax:.3g} on calibration data, past {short_dtype(dtype)}'s max "
                f"{torch.finfo(dtype).max:.6g} / margin {margin:g}"
            )
    return ""


class AssignPrecision(Pass):
    """Give every float-valued node a dtype and a reason."""

    def __init__(self, *, target: torch.dtype, keep_fp32: Sequence[str] = (), margin: float = RANGE_MARGIN):
        self.target, self.keep_fp32, self.margin = target, tuple(keep_fp32), margin

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        graph_record(gm).target = self.target
        matched: set[str] = set()
        counts = {"low": 0, "high": 0}
        for node in gm.graph.nodes:
            rec = record(node)
            dtype = float_dtype(node.meta.get("val"))
            if node.op in ("placeholder", "get_attr"):
                rec.dtype = dtype
                rec.rule = "model input" if node.op == "placeholder" else "parameter"
                rec.reason = "as given" if node.op == "placeholder" else "converted to its consumers' dtype"
                continue
            if node.op != "call_function" or dtype is None:
                continue
            self._assign(node, dtype, matched)
            counts["low" if rec.dtype == self.target else "high"] += 1
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
        rec.op_class = rule.op_class
        high = torch.promote_types(captured, torch.float32)  # fp32, or f64 where the model computes in f64
        key = self._keep(node)
        if key is not None:
            matched.add(key)
            rec.dtype, rec.rule, rec.reason = high, "keep_fp32", f"keep_fp32 names {key!r}"
            return
        if rule.op_class is OpClass.FIXED:
            rec.dtype, rec.rule, rec.reason = written_dtype(node), "fixed", rule.why
            return
        if rule.op_class is OpClass.FP32 and not rule.fp32_inside:
            rec.dtype, rec.rule, rec.reason = high, "op class", rule.why
            return
        if rule.op_class is OpClass.LOW:
            dtype, why = self.target, rule.why
        else:  # FOLLOW, or a kernel that keeps fp32 math inside on low-precision I/O
            acts = [a for a in float_inputs(node) if a.op != "get_attr"]
            if acts:
                dtype = promote([planned_dtype(a) for a in acts])
                why = f"follows its input{'s' if len(acts) > 1 else ''} ({short_dtype(dtype)})"
            elif float_inputs(node):
                dtype, why = self.target, "its float inputs are parameters, converted once"
            else:
                dtype, why = captured, "creates its value; dtype as captured"
            if rule.op_class is OpClass.FP32:
                why = f"{rule.why}; I/O {why}"
        rec.dtype, rec.rule, rec.reason = (
            dtype,
            "op class" if rule.op_class is not OpClass.FOLLOW else "follows inputs",
            why,
        )
        if dtype in (torch.float16, torch.bfloat16):
            over = out_of_range(node, dtype, self.margin)
            if over:
                rec.dtype, rec.rule, rec.reason = high, "range", over
        rec.math_dtype = torch.float32 if rule.fp32_inside and rec.dtype != high else None


def _example_paths(gm: torch.fx.GraphModule) -> list[str]:
    paths = sorted({record(n).module_path for n in gm.graph.nodes if record(n).module_path})
    return paths[:3]
