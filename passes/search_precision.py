"""search_precision: meet the user's tolerance with the fewest nodes kept high.

Runs only when compile() is given a ``tolerance``. Three steps:

1. **Sensitivity** (on up to ``SENSITIVITY_SAMPLES`` calibration samples): one fp32 run with autograd
   where every candidate node (an op the plan puts in low precision that computes something: not a
   view or copy) is also run in its planned dtype on the fp32 inputs (shadow execution). Its local
   error ``d_n`` is carried to the outputs to first order, ``J_n d_n``, with random projections:
   for ``r ~ N(0, I)`` over the outputs (scaled by 1/||ref||), ``E[(r . J_n d_n)^2] = ||J_n d_n||^2``,
   and ``r . J_n d_n`` is the gradient of ``r . out`` at node n dotted with ``d_n``. So ``PROJECTIONS``
   backward passes per sample give every node's own share of the output error (relative L2) at once.
   The whole-model evaluation of the plan with every candidate low comes first: where it meets the
   tolerance, nothing needs ranking and no sensitivity is measured (``report.culprits()`` is then empty).
2. **Ranked search**: candidates sorted by that share; the plan keeps the first k of them in fp32 (the
   rest of the plan re-derived by assign_precision: follow-class nodes follow). k is found with
   whole-model evaluations on the held-out samples: k = 0, then 1, 2, 4, ... until the tolerance is
   met, then bisection between the last two. A tighter tolerance can only move k up, so it never
   keeps fewer nodes high (bisection paths split only where the looser one passes).
3. The plan found is left in the records for insert_casts; the report gets every node's sensitivity,
   the evaluations made and their errors. If only the all-candidates plan meets the tolerance, that
   is all-fp32 in disguise: a ToleranceError says so, with the best error short of it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch
import torch.fx
import torch.fx._pytree as fx_pytree
import torch.utils._pytree as pytree
from torch.utils.flop_counter import FlopCounterMode

from mpcompiler import dtypes, fp8
from mpcompiler.accuracy import Metric, flat_outputs
from mpcompiler.errors import ToleranceError
from mpcompiler.ir import OpClass, SearchLog, float_dtype, graph_record, op_name, record
from mpcompiler.ops import FOLLOW_OPS, convert_inputs
from mpcompiler.pass_manager import Pass, PassManager, PassResult, progress
from mpcompiler.passes import assign_fp8
from mpcompiler.samples import Sample, to_device

SENSITIVITY_SAMPLES = 4  # calibration samples the sensitivity is estimated on
PROJECTIONS = 8  # random output projections per sample: the estimate's relative spread is ~1/sqrt(8 * samples)


def _cast(value, dtype: torch.dtype, saturate: bool):
    """A float tensor in ``dtype`` (clamped to its range first when ``saturate``); other values as they are."""
    if not isinstance(value, torch.Tensor) or not value.dtype.is_floating_point or value.dtype == dtype:
        return value
    if saturate and dtype.itemsize < value.dtype.itemsize:
        limit = torch.finfo(dtype).max
        value = value.clamp(-limit, limit)
    return value.to(dtype)


def planned_call(node: torch.fx.Node, args: tuple, kwargs: dict):
    """Run ``node``'s op with its float inputs converted as insert_casts will convert them (and an fp8
    linear's GEMM as lower_fp8 writes it)."""
    rec = record(node)
    if rec.dtype is None or rec.op_class is OpClass.FIXED:
        return node.target(*args, **kwargs)
    args, kwargs = convert_inputs(
        node, args, kwargs, rec.dtype, lambda v, want, sat: pytree.tree_map(lambda t: _cast(t, want, sat), v)
    )
    if rec.fp8 is not None:
        x, weight, bias = args[0], args[1], (args[2] if len(args) > 2 else kwargs.get("bias"))
        scales = [torch.tensor(s, dtype=torch.float32, device=x.device) for s in (rec.fp8.x_scale, rec.fp8.w_scale)]
        x8, w8 = fp8.quantize(x, rec.fp8.x_scale), fp8.quantize(weight, rec.fp8.w_scale)
        return fp8.linear(x8, w8, *scales, bias, rec.dtype)
    return node.target(*args, **kwargs)


class PlanRunner(torch.fx.Interpreter):
    """Runs the graph as its records plan it, before insert_casts: what the emitted module computes."""

    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__(gm, garbage_collect_values=True)

    def run_node(self, n: torch.fx.Node):
        if n.op == "call_function" and float_dtype(n.meta.get("val")) is not None:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            return planned_call(n, args, kwargs)
        return super().run_node(n)


def _run_samples(gm, samples: Sequence[Sample], device, what: str) -> list[list]:
    in_spec = gm.graph._codegen.pytree_info.in_spec
    runner, outs = PlanRunner(gm), []
    with torch.no_grad():
        for sample in progress(samples, what):
            flat = fx_pytree.tree_flatten_spec(to_device(sample, device), in_spec)
            out = runner.run(*flat)
            outs.append([t.float().cpu() if isinstance(t, torch.Tensor) else t for t in flat_outputs(out)])
    return outs


def _computes(node: torch.fx.Node) -> bool:
    """Whether keeping the node high could reduce the error: it computes, or it reads a parameter (an
    embedding lookup rounds its table), rather than only moving values another op rounded."""
    if node.op != "call_function" or op_name(node) == "getitem":
        return False
    return op_name(node) not in FOLLOW_OPS or any(a.op == "get_attr" for a in node.all_input_nodes)


class _Shadow(torch.fx.Interpreter):
    """An fp32 run with autograd that also runs each candidate in its planned dtype on the fp32 inputs."""

    def __init__(self, gm, candidates: set[torch.fx.Node]):
        super().__init__(gm)
        self.candidates = candidates
        self.values: dict[torch.fx.Node, torch.Tensor] = {}
        self.deltas: dict[torch.fx.Node, torch.Tensor] = {}
        self.local: dict[torch.fx.Node, float] = {}

    def run_node(self, n: torch.fx.Node):
        out = super().run_node(n)
        if n.op in ("placeholder", "get_attr") and isinstance(out, torch.Tensor) and out.dtype.is_floating_point:
            return out.detach().requires_grad_()  # so that every activation has a gradient
        if n in self.candidates:
            value = next((t for t in _tensors(out) if t.dtype.is_floating_point), None)
            if value is not None:
                args, kwargs = self.fetch_args_kwargs_from_env(n)
                args, kwargs = pytree.tree_map_only(torch.Tensor, torch.Tensor.detach, (args, kwargs))
                with torch.no_grad():
                    shadow = planned_call(n, args, kwargs)
                low = next(t for t in _tensors(shadow) if t.dtype.is_floating_point)
                delta = low.to(value.dtype) - value.detach()
                self.values[n], self.deltas[n] = value, delta
                self.local[n] = float(delta.norm() / value.detach().norm().clamp_min(1e-30))
        return out


def _tensors(value) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]


class _Flops(torch.fx.Interpreter):
    """Per node with matmul/conv/attention work: its FLOPs per call (torch's FlopCounterMode)."""

    def __init__(self, gm):
        super().__init__(gm, garbage_collect_values=True)
        self.flops: dict[torch.fx.Node, int] = {}

    def run_node(self, n: torch.fx.Node):
        with FlopCounterMode(display=False) as counter:
            out = super().run_node(n)
        if counter.get_total_flops():
            self.flops[n] = max(self.flops.get(n, 0), counter.get_total_flops())
        return out


def flops(gm, samples: Sequence[Sample], device) -> dict[torch.fx.Node, int]:
    """FLOPs per call of each node with matmul/conv/attention work (the largest sample's), run in fp32."""
    in_spec = gm.graph._codegen.pytree_info.in_spec
    counter = _Flops(gm)
    with torch.no_grad():
        for sample in samples:
            counter.run(*fx_pytree.tree_flatten_spec(to_device(sample, device), in_spec))
    return counter.flops


def sensitivities(gm, candidates: list[torch.fx.Node], samples: Sequence[Sample], device, refs_norms):
    """Per candidate: (estimated rel. L2 output error it causes alone, its local relative error)."""
    in_spec = gm.graph._codegen.pytree_info.in_spec
    shadow = _Shadow(gm, set(candidates))
    squared = dict.fromkeys(candidates, 0.0)
    local = dict.fromkeys(candidates, 0.0)
    generator = torch.Generator().manual_seed(0)  # the same ranking on every run: tolerances compare
    for sample in progress(samples, f"sensitivity ({PROJECTIONS} projections a sample)"):
        flat = fx_pytree.tree_flatten_spec(to_device(sample, device), in_spec)
        with torch.enable_grad():
            outs = flat_outputs(shadow.run(*flat))
            pairs = [(o, norm) for o, norm in zip(outs, refs_norms, strict=True) if o is not None and norm]
            nodes = [n for n in candidates if n in shadow.values and shadow.values[n].requires_grad]
            values = [shadow.values[n] for n in nodes]
            for _ in range(PROJECTIONS):
                loss = sum((torch.randn(o.shape, generator=generator).to(o) * o).sum() / norm for o, norm in pairs)
                grads = torch.autograd.grad(loss, values, retain_graph=True, allow_unused=True)
                for n, g in zip(nodes, grads, strict=True):
                    if g is not None:
                        squared[n] += float((g * shadow.deltas[n]).sum()) ** 2 / PROJECTIONS
        for n in candidates:
            local[n] = max(local[n], shadow.local.get(n, 0.0))
        shadow.values.clear()  # free this sample's autograd graph
        shadow.deltas.clear()
    count = max(len(samples), 1)  # a sample's error: the mean over samples of its square
    return {n: (math.sqrt(squared[n] / count), local[n]) for n in candidates}


class SearchPrecision(Pass):
    """Keep the most sensitive nodes high until the held-out error meets the tolerance."""

    requires = ("plan",)  # and what re-planning requires, which its own manager checks

    def __init__(
        self,
        *,
        tolerance: float,
        metric: Metric,
        replan: PassManager,  # assign_precision and place_casts: re-derive the plan from the records
        calib_samples: Sequence[Sample],
        val_samples: Sequence[Sample],
        val_refs: Callable[[], Sequence[Sequence]],  # the fp32 model's outputs on them, computed on demand
        device: torch.device,
    ):
        self.tolerance, self.metric, self.replan = tolerance, metric, replan
        self.calib, self.val, self.val_refs, self.device = calib_samples, val_samples, val_refs, device

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        start = time.perf_counter()
        refs = self.val_refs()
        log = SearchLog(tolerance=self.tolerance, metric=self.metric.name)
        samples = self.calib[:SENSITIVITY_SAMPLES]
        for n, count in flops(gm, samples, self.device).items():
            record(n).flops = count
        k = None
        fp8_nodes = [n for n in gm.graph.nodes if record(n).fp8 is not None]
        if fp8_nodes:  # first stage: e4m3 linears back to the low dtype, most sensitive first
            k8 = self._stage(gm, fp8_nodes, refs, samples, log, log.fp8_evaluations, fp8=True)
            log.fp8_candidates, log.fp8_kept = len(fp8_nodes), len(fp8_nodes) if k8 is None else k8
            log.fp8_kept_with = sum(1 for n in fp8_nodes if record(n).fp8_promoted) - log.fp8_kept
            k = 0 if k8 is not None else None
        candidates = [n for n in gm.graph.nodes if _computes(n) and record(n).dtype in dtypes.LOW]
        if k is None:  # then low-precision ops to fp32
            k = self._stage(gm, candidates, refs, samples, log, log.evaluations, fp8=False)
        all_high = not any(record(n).dtype in dtypes.LOW for n in gm.graph.nodes if n.op == "call_function")
        if k is None or (k > 0 and all_high):
            tried = ", ".join(f"{kk} high: {v:.3g}" for kk, v in sorted(log.evaluations))
            raise ToleranceError(
                f"no plan short of all-fp32 meets {self.metric.name} {self.metric.relation} {self.tolerance:g} on "
                f"the {len(self.val)} held-out samples it judges plans on; of the {len(candidates)} low-precision ops, "
                f"the plans tried kept the most sensitive high and measured ({tried}). Loosen the tolerance, "
                "keep_fp32 what must stay fp32, or check the fp32 model on these samples."
            )
        log.kept_high = k
        log.candidates = len(candidates)
        log.wall_s = time.perf_counter() - start
        graph_record(gm).search = log
        return PassResult(
            modified=k > 0 or log.fp8_kept > 0,
            stats={"candidates": len(candidates), "kept_high": k, "evaluations": len(log.evaluations)}
            | ({"fp8_candidates": len(fp8_nodes), "fp8_kept": log.fp8_kept} if fp8_nodes else {}),
        )

    def _stage(self, gm, candidates, refs, samples, log: SearchLog, evaluations: list, *, fp8: bool) -> int | None:
        """The smallest k such that the plan that keeps the k most sensitive ``candidates`` one level up
        (out of fp8, or out of the low dtype into fp32) meets the tolerance; None if keeping all misses.
        The records are left at the plan of that k (of all, if None)."""
        level = {n: "fp8" if fp8 else dtypes.short(record(n).dtype) for n in candidates}
        groups: dict[tuple, list[torch.fx.Node]] = {}  # fp8 linears that run as one GEMM go up together
        for n in candidates if fp8 else ():
            groups.setdefault(assign_fp8.gemm_group(n), []).append(n)
        mates = {n: group for group in groups.values() for n in group}
        kept = "kept out of fp8" if fp8 else "kept high"
        ranked: list[torch.fx.Node] = []  # most sensitive first, once measured
        sens: dict[torch.fx.Node, tuple[float, float]] = {}
        judged: dict[int, bool] = {}

        def apply(k: int) -> None:  # the plan that keeps the k most sensitive a level up
            up: dict[torch.fx.Node, str] = {}
            for i, n in enumerate(ranked[:k]):
                cost = f"~{sens[n][0]:.2g} rel. L2 at the outputs (rank {i + 1} of {len(ranked)})"
                up.setdefault(n, f"{kept} by the tolerance search: alone in {level[n]} it would cost {cost}")
                for m in mates.get(n, ()):  # the fp8 linears of its input with it
                    up.setdefault(m, f"{kept} with {n.name} by the tolerance search: one GEMM on one input, which "
                                     "e4m3 and fp16 halves would split in two")  # fmt: skip
            for n in candidates:
                if fp8:
                    record(n).fp8_promoted = up.get(n, "")
                else:
                    record(n).promoted = up.get(n, "")
            self.replan.run(gm)

        def evaluate(k: int) -> bool:
            if k not in judged:
                apply(k)
                what = f"tolerance search, {k} of {len(candidates)} {kept}"
                value = self.metric(_run_samples(gm, self.val, self.device, what), refs, self.val)
                evaluations.append((k, value))
                judged[k] = self.metric.meets(value, self.tolerance)
            return judged[k]

        if not evaluate(0) and candidates:  # the plan with all of them low misses: rank them by what each costs
            sens.update(sensitivities(gm, candidates, samples, self.device, _ref_norms(refs)))
            log.sensitivity_passes += len(samples) * (1 + PROJECTIONS)
            for n, (share, local) in sens.items():
                record(n).sensitivity, record(n).local_error = share, local
            ranked.extend(sorted(candidates, key=lambda n: -sens[n][0]))
        k = _smallest_passing(evaluate, len(ranked))
        if evaluations[-1][0] != (len(ranked) if k is None else k):
            apply(len(ranked) if k is None else k)  # leave the records at the plan chosen
        return k


def _ref_norms(refs: Sequence[Sequence]) -> list[float]:
    """Per flat output: the fp32 reference's L2 norm in a sample (the root mean square over samples; 0 for
    non-float outputs), against which a sample's output error is relative."""
    norms = []
    for i in range(len(refs[0])):
        total = 0.0
        for ref in refs:
            r = ref[i]
            if isinstance(r, torch.Tensor) and r.dtype.is_floating_point:
                total += float(r.double().pow(2).sum())
        norms.append(math.sqrt(total / len(refs)))
    return norms


def _smallest_passing(passes: Callable[[int], bool], n: int) -> int | None:
    """The smallest k in [0, n] with passes(k), assuming passes is monotone: k = 0, 1, 2, 4, ... then
    bisection. None if even n fails."""
    if passes(0):
        return 0
    lo, hi = 0, 1
    while hi < n and not passes(hi):
        lo, hi = hi, min(2 * hi, n)
    if hi >= n and not passes(n):
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if passes(mid):
            hi = mid
        else:
            lo = mid
    return hi
