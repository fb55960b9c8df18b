"""calibrate_ranges: stream every calibration sample through the fp32 graph once, recording per value
min, max, absmax, the smallest nonzero |x|, the 99.99th percentile of |x|, NaN/inf counts, and the
share of nonzero values below fp16's smallest normal. Parameters get the same statistics from their tensors.

It also records, for norms, reductions and matmuls, the peak of what the op computes inside its
kernel (:class:`mpcompiler.ir.InnerRange`): the squared deviations of a variance, the running sum of
a sum or mean, the partial sums of a matmul. Those can pass fp16's range while the op's inputs and
output do not. Each op's row in the op table (``mpcompiler.ops.OPS``) says what to measure, or why
nothing is (convolutions: a second convolution of |x| with |w| per sample; left for later).

The percentile comes from a histogram of log2|x| (4 bins per octave, mergeable across samples), so
it is exact to within 19%; min/max/absmax are exact.

All of it is sums and extremes over samples: a :class:`Calibration` (``mpcompiler.calibrate``) made in
another process, over other samples, merges into these statistics (``compile(calibration=...)``).
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx
import torch.fx._pytree as fx_pytree

from mpcompiler.errors import CalibrationError
from mpcompiler.files import write_atomic
from mpcompiler.ir import FP16_TINY, InnerRange, RangeStats, attr_of, graph_record, module_path, op_name, record
from mpcompiler.ops import SAME_VALUES, inner_peak
from mpcompiler.pass_manager import Pass, PassResult, progress
from mpcompiler.samples import Sample, to_device

_LOG2_LO, _LOG2_HI, _BINS_PER_OCTAVE = -150, 130, 4  # covers fp32's subnormals to its max
_BINS = (_LOG2_HI - _LOG2_LO) * _BINS_PER_OCTAVE
_HIST_SAMPLE = 1 << 20  # histogram a random subset of larger tensors


class _Stats:
    """Streaming statistics of one value."""

    def __init__(self):
        self.min, self.max, self.absmin = math.inf, -math.inf, math.inf
        self.nan = self.inf = self.count = self.nonzero = self.subnormal = self.samples = 0
        self.hist = torch.zeros(_BINS, dtype=torch.float64)

    def update(self, t: torch.Tensor) -> None:
        self.samples += 1
        x = t.detach().reshape(-1).float()
        a = x.abs()
        finite = a < math.inf  # NaN compares false too
        n_finite = int(finite.sum())
        if n_finite < x.numel():
            nan = int(torch.isnan(x).sum())
            self.nan += nan
            self.inf += x.numel() - n_finite - nan
            x, a = x[finite], a[finite]
        if x.numel() == 0:
            return
        lo, hi = torch.aminmax(x)
        self.min, self.max = min(self.min, float(lo)), max(self.max, float(hi))
        nz = a[a > 0]
        self.count += x.numel()
        self.nonzero += nz.numel()
        self.subnormal += int((nz < FP16_TINY).sum())
        if nz.numel() == 0:
            return
        self.absmin = min(self.absmin, float(nz.min()))
        weight = 1.0
        if nz.numel() > _HIST_SAMPLE:
            gen = torch.Generator(device=nz.device).manual_seed(self.samples)
            idx = torch.randint(nz.numel(), (_HIST_SAMPLE,), generator=gen, device=nz.device)
            weight, nz = nz.numel() / _HIST_SAMPLE, nz[idx]
        hist = torch.histc(torch.log2(nz), bins=_BINS, min=_LOG2_LO, max=_LOG2_HI)
        self.hist += hist.double().cpu() * weight

    def merge(self, other: _Stats) -> _Stats:
        """Add ``other``'s samples to these statistics (sums, extremes and histograms all add): statistics
        gathered in several processes, each over part of the samples, merge into those of all of them
        (exactly, but for tensors over 2**20 elements, whose histograms are of random subsets)."""
        self.min, self.max = min(self.min, other.min), max(self.max, other.max)
        self.absmin = min(self.absmin, other.absmin)
        for name in ("nan", "inf", "count", "nonzero", "subnormal", "samples"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.hist += other.hist
        return self

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict) -> _Stats:
        stats = cls()
        stats.__dict__.update(data)
        return stats

    def percentile_abs(self, q: float) -> float:
        rank = q * self.count - (self.count - self.nonzero)  # zeros sort first
        if rank <= 0 or self.nonzero == 0:
            return 0.0
        cum = torch.cumsum(self.hist, 0)
        i = int(torch.searchsorted(cum, torch.tensor(rank * float(cum[-1]) / self.nonzero, dtype=torch.float64)))
        return float(2.0 ** (_LOG2_LO + (min(i, _BINS - 1) + 1) / _BINS_PER_OCTAVE))

    def finish(self) -> RangeStats:
        empty = self.count == 0
        absmax = 0.0 if empty else max(abs(self.min), abs(self.max))
        return RangeStats(
            min=0.0 if empty else self.min,
            max=0.0 if empty else self.max,
            absmax=absmax,
            p9999=min(self.percentile_abs(0.9999), absmax),  # a bin's upper edge can pass the largest value
            nan=self.nan,
            inf=self.inf,
            subnormal_share=self.subnormal / self.nonzero if self.nonzero else 0.0,
            samples=self.samples,
            absmin=0.0 if self.absmin == math.inf else self.absmin,
        )


_FORMAT = "mpcompiler.calibration/1"


@dataclass
class Calibration:
    """Calibration statistics of one captured graph: per float value (by node name) what it is (op,
    dtype and shape), its statistics and the peak of what it computes inside; and the input dims the
    capture made dynamic (by input name), which shape the graph. Statistics made in several processes,
    each over part of the samples, merge (:meth:`merge`) into those of all the samples; ``compile(model,
    calib_data, calibration=...)`` captures with the same dynamic dims and adds its own samples'
    statistics to them. ``mpcompiler.calibrate`` makes one."""

    nodes: dict[str, tuple[str, _Stats, InnerRange | None]]
    samples: int
    dynamic: dict[str, list[int]]

    def merge(self, *others: Calibration) -> Calibration:
        """These statistics and ``others``' together, as if one process had calibrated on all their samples."""
        nodes = {name: (what, _Stats().merge(st), inner) for name, (what, st, inner) in self.nodes.items()}
        for other in others:
            if other.dynamic != self.dynamic:
                raise CalibrationError(
                    f"the merged statistics were captured with other dynamic dims ({other.dynamic} there, "
                    f"{self.dynamic} here): the samples' shapes varied in one process and not in another, so "
                    "the graphs differ. Calibrate with the same dynamic= in every process (the union: "
                    f"{_union(self.dynamic, other.dynamic)})"
                )
            _check_same_graph(nodes, other.nodes, "merged statistics")
            for name, (_, st, inner) in other.nodes.items():
                what, mine, seen = nodes[name]
                nodes[name] = (what, mine.merge(st), _higher(seen, inner))
        return Calibration(nodes, self.samples + sum(o.samples for o in others), self.dynamic)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the statistics to ``path`` (atomically; read back with :meth:`load`)."""
        nodes = {
            name: {"value": what, "stats": st.to_dict(), "inner": inner.to_dict() if inner else None}
            for name, (what, st, inner) in self.nodes.items()
        }
        buffer = io.BytesIO()
        torch.save({"format": _FORMAT, "samples": self.samples, "dynamic": self.dynamic, "nodes": nodes}, buffer)
        return write_atomic(path, buffer.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Calibration:
        """Read statistics written by :meth:`save`; another file is a CalibrationError."""
        try:
            data = torch.load(path, weights_only=True)
        except Exception as exc:
            raise CalibrationError(f"{path} is not calibration statistics mpcompiler can read: {exc}") from exc
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise CalibrationError(f"{path} is not calibration statistics written by Calibration.save ({_FORMAT})")
        nodes = {
            name: (n["value"], _Stats.from_dict(n["stats"]), InnerRange(**n["inner"]) if n["inner"] else None)
            for name, n in data["nodes"].items()
        }
        return cls(nodes, data["samples"], data["dynamic"])


def _value_kind(node: torch.fx.Node) -> str:
    """What a value is, for matching statistics to it: its op, and its tensors' dtypes and shapes."""
    tensors = [f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}" for t in _float_tensors(node.meta.get("val"))]
    return f"{op_name(node)} {', '.join(tensors)}"


def _union(a: dict[str, list[int]], b: dict[str, list[int]]) -> dict[str, list[int]]:
    return {name: sorted(set(a.get(name, ())) | set(b.get(name, ()))) for name in a.keys() | b.keys()}


def _higher(a: InnerRange | None, b: InnerRange | None) -> InnerRange | None:
    return b if a is None or (b is not None and b.absmax > a.absmax) else a


def _check_same_graph(mine: dict, theirs: dict, what: str) -> None:
    """Statistics merge value by value: both must be of the same graph, each value of the same op, dtype
    and shape. The first value that differs, in graph order, is named."""
    for name in [*mine, *(n for n in theirs if n not in mine)]:
        ours, other = mine.get(name, (None,))[0], theirs.get(name, (None,))[0]
        if ours != other:
            raise CalibrationError(
                f"the {what} are of another graph: value %{name} is {other or 'absent'} there and "
                f"{ours or 'absent'} here. Calibrate the same model, with samples of the same structure, the "
                "same dynamic dims (mpcompiler.calibrate's dynamic=), torch and mpcompiler"
            )


def _float_tensors(val):
    if isinstance(val, torch.Tensor):
        return [val] if val.dtype.is_floating_point else []
    if isinstance(val, (tuple, list)):
        return [t for v in val for t in _float_tensors(v)]
    return []


class _Recorder(torch.fx.Interpreter):
    """Runs the graph, feeding each float output into its node's statistics."""

    def __init__(self, gm, stats: dict[torch.fx.Node, _Stats]):
        super().__init__(gm, garbage_collect_values=True)
        self.stats = stats
        self.inner: dict[torch.fx.Node, InnerRange] = {}
        # per sample: "NaN"/"inf" -> (step, node) where that value first appeared, in execution order
        self.first: dict[str, tuple[int, torch.fx.Node]] = {}

    def run_node(self, n: torch.fx.Node):
        try:
            out = super().run_node(n)
            if n in self.stats and n.op == "call_function":
                self._measure_inside(n)
        except Exception as exc:
            raise _NodeFailure(n, exc) from exc
        st = self.stats.get(n)
        if st is not None:
            for t in _float_tensors(out):
                nan, inf = st.nan, st.inf
                st.update(t)  # counts NaN and inf: no second pass over the tensor to find them
                if st.nan > nan:
                    self.first.setdefault("NaN", (len(self.first), n))
                if st.inf > inf:
                    self.first.setdefault("inf", (len(self.first), n))
        return out

    def _measure_inside(self, n: torch.fx.Node) -> None:
        args, kwargs = self.fetch_args_kwargs_from_env(n)  # still held: values are freed after run_node
        measured = inner_peak(n, args, kwargs)
        if measured is None or math.isnan(measured[0]):
            return
        seen = self.inner.get(n)
        if seen is None or measured[0] > seen.absmax:
            self.inner[n] = InnerRange(absmax=measured[0], what=measured[1])


class _NodeFailure(Exception):
    def __init__(self, node, exc):
        super().__init__(str(exc))
        self.node, self.exc = node, exc


def _where(node: torch.fx.Node) -> str:
    if node.op == "placeholder":
        return f"input %{node.name}"
    return f"%{node.name} ({op_name(node)}) in {module_path(node) or 'the top-level graph'}"


def _non_finite(outputs, first: dict[str, tuple[int, torch.fx.Node]], index: int) -> str | None:
    """What is not finite in the fp32 outputs of sample ``index`` (NaN, inf or both) and where each first
    appeared; None if all is finite. An inf before the first NaN is named too: the likely cause (inf - inf)."""
    tensors = _float_tensors(list(outputs))
    kinds = [k for k, test in (("NaN", torch.isnan), ("inf", torch.isinf)) if any(test(t).any() for t in tensors)]
    if not kinds:
        return None
    shown = {k: first[k] for k in kinds if k in first}  # a kind missing here came from a parameter or constant
    if "NaN" in shown and "inf" in first and first["inf"][0] < shown["NaN"][0]:
        shown["inf"] = first["inf"]
    where = [f"the first {k} appears at {_where(node)}" for k, (_, node) in sorted(shown.items(), key=lambda kv: kv[1])]
    return (
        f"the fp32 model gives {' and '.join(kinds)} in its outputs on calibration sample {index}"
        + (f"; {' and '.join(where)}" if where else "")
        + ". Calibration needs samples the model handles."
    )


class CalibrateRanges(Pass):
    """Record per-value range statistics over all calibration samples (fp32, no graph change)."""

    ensures = ("ranges",)

    def __init__(
        self, *, samples: list[Sample], device: torch.device, progress: bool = True, prior: Calibration | None = None
    ):
        self.samples, self.device, self.progress, self.prior = samples, device, progress, prior
        self.calibration: Calibration | None = None  # the statistics of the last call, prior included

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        stats: dict[torch.fx.Node, _Stats] = {}
        for node in gm.graph.nodes:
            computed = node.op == "placeholder" or (node.op == "call_function" and op_name(node) not in SAME_VALUES)
            if computed and _float_tensors(node.meta.get("val")):
                stats[node] = _Stats()
        in_spec = gm.graph._codegen.pytree_info.in_spec
        recorder = _Recorder(gm, stats)
        if self.prior is not None:  # another process's samples: their statistics start these
            here = {n.name: (_value_kind(n),) for n in stats}
            _check_same_graph(here, self.prior.nodes, "calibration statistics given")
            for node in stats:
                _, st, inner = self.prior.nodes[node.name]
                stats[node].merge(st)
                if inner is not None:
                    recorder.inner[node] = inner
        bar = progress(self.samples, "calibrate_ranges", show=self.progress)
        with torch.no_grad():
            for index, sample in enumerate(bar):
                try:
                    flat = fx_pytree.tree_flatten_spec(to_device(sample, self.device), in_spec)
                except Exception as exc:
                    raise CalibrationError(
                        f"calibration sample {index} does not match the captured inputs ({in_spec}): {exc}"
                    ) from exc
                recorder.first = {}
                try:
                    outputs = recorder.run(*flat)
                except _NodeFailure as f:
                    raise CalibrationError(
                        f"calibration sample {index} failed at {_where(f.node)}: {type(f.exc).__name__}: {f.exc}"
                    ) from f.exc
                # inf too: fp32 overflowed (or the sample holds inf); ranges and errors measured on it mean nothing
                message = _non_finite(outputs, recorder.first, index)
                if message is not None:
                    raise CalibrationError(message)
        samples = len(self.samples) + (self.prior.samples if self.prior else 0)
        values = {n.name: (_value_kind(n), st, recorder.inner.get(n)) for n, st in stats.items()}
        self.calibration = Calibration(values, samples, graph_record(gm).dynamic_dims)
        for node in gm.graph.nodes:
            if node in stats:
                record(node).range = stats[node].finish()
                record(node).inner = recorder.inner.get(node)
            elif node.op == "get_attr" and _float_tensors(node.meta.get("val")):
                st = _Stats()
                st.update(attr_of(gm, node.target))
                record(node).range = st.finish()
        # Views hold their input's values: copy the range forward (graph order is topological).
        for node in gm.graph.nodes:
            if node.op == "call_function" and node not in stats and op_name(node) in SAME_VALUES:
                source = node.args[0]
                if isinstance(source, torch.fx.Node):
                    record(node).range = record(source).range
        graph_record(gm).calib_samples = samples
        return PassResult(modified=True, stats={"samples": samples, "values": len(stats), "inner": len(recorder.inner)})
