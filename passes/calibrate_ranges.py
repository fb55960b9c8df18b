"""calibrate_ranges: stream every calibration sample through the fp32 graph once, recording per value
min, max, absmax, the 99.99th percentile of |x|, NaN/inf counts, and the share of nonzero values
below fp16's smallest normal. Parameters get the same statistics from their tensors.

The percentile comes from a histogram of log2|x| (4 bins per octave, mergeable across samples), so
it is exact to within 19%; min/max/absmax are exact.
"""

from __future__ import annotations

import math

import torch
import torch.fx
import torch.fx._pytree as fx_pytree
from tqdm.auto import tqdm

from mpcompiler.capture import Sample, to_device
from mpcompiler.errors import CalibrationError
from mpcompiler.ir import FP16_TINY, RangeStats, attr_of, graph_record, module_path, op_name, record
from mpcompiler.pass_manager import Pass, PassResult

_LOG2_LO, _LOG2_HI, _BINS_PER_OCTAVE = -150, 130, 4  # covers fp32's subnormals to its max
_BINS = (_LOG2_HI - _LOG2_LO) * _BINS_PER_OCTAVE
_HIST_SAMPLE = 1 << 20  # histogram a random subset of larger tensors

# Ops whose output holds exactly their input's values: their statistics are their input's.
_SAME_VALUES = frozenset(
    "view _unsafe_view reshape view_as transpose t permute squeeze unsqueeze flatten unflatten "
    "contiguous clone alias detach expand".split()
)


class _Stats:
    """Streaming statistics of one value."""

    def __init__(self):
        self.min, self.max = math.inf, -math.inf
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
        weight = 1.0
        if nz.numel() > _HIST_SAMPLE:
            gen = torch.Generator(device=nz.device).manual_seed(self.samples)
            idx = torch.randint(nz.numel(), (_HIST_SAMPLE,), generator=gen, device=nz.device)
            weight, nz = nz.numel() / _HIST_SAMPLE, nz[idx]
        hist = torch.histc(torch.log2(nz), bins=_BINS, min=_LOG2_LO, max=_LOG2_HI)
        self.hist += hist.double().cpu() * weight

    def percentile_abs(self, q: float) -> float:
        rank = q * self.count - (self.count - self.nonzero)  # zeros sort first
        if rank <= 0 or self.nonzero == 0:
            return 0.0
        cum = torch.cumsum(self.hist, 0)
        i = int(torch.searchsorted(cum, torch.tensor(rank * float(cum[-1]) / self.nonzero, dtype=torch.float64)))
        return float(2.0 ** (_LOG2_LO + (min(i, _BINS - 1) + 1) / _BINS_PER_OCTAVE))

    def finish(self) -> RangeStats:
        empty = self.count == 0
        return RangeStats(
            min=0.0 if empty else self.min,
            max=0.0 if empty else self.max,
            absmax=0.0 if empty else max(abs(self.min), abs(self.max)),
            p9999=self.percentile_abs(0.9999),
            nan=self.nan,
            inf=self.inf,
            subnormal_share=self.subnormal / self.nonzero if self.nonzero else 0.0,
            samples=self.samples,
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
        self.first_nan: torch.fx.Node | None = None

    def run_node(self, n: torch.fx.Node):
        try:
            out = super().run_node(n)
        except Exception as exc:
            raise _NodeFailure(n, exc) from exc
        st = self.stats.get(n)
        if st is not None:
            for t in _float_tensors(out):
                st.update(t)
                if self.first_nan is None and torch.isnan(t).any():
                    self.first_nan = n
        return out


class _NodeFailure(Exception):
    def __init__(self, node, exc):
        super().__init__(str(exc))
        self.node, self.exc = node, exc


def _where(node: torch.fx.Node) -> str:
    return f"%{node.name} ({op_name(node)}) in {module_path(node) or 'the top-level graph'}"


class CalibrateRanges(Pass):
    """Record per-value range statistics over all calibration samples (fp32, no graph change)."""

    def __init__(self, *, samples: list[Sample], device: torch.device, progress: bool = True):
        self.samples, self.device, self.progress = samples, device, progress

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        stats: dict[torch.fx.Node, _Stats] = {}
        for node in gm.graph.nodes:
            computed = node.op == "placeholder" or (node.op == "call_function" and op_name(node) not in _SAME_VALUES)
            if computed and _float_tensors(node.meta.get("val")):
                stats[node] = _Stats()
        in_spec = gm.graph._codegen.pytree_info.in_spec
        recorder = _Recorder(gm, stats)
        # disable=None: tqdm shows the bar only on a terminal
        bar = tqdm(
            self.samples,
            desc="mpcompiler: calibrate_ranges",
            unit="sample",
            disable=None if self.progress else True,
            leave=False,
        )
        with torch.no_grad():
            for index, sample in enumerate(bar):
                try:
                    flat = fx_pytree.tree_flatten_spec(to_device(sample, self.device), in_spec)
                except Exception as exc:
                    raise CalibrationError(
                        f"calibration sample {index} does not match the captured inputs ({in_spec}): {exc}"
                    ) from exc
                recorder.first_nan = None
                try:
                    outputs = recorder.run(*flat)
                except _NodeFailure as f:
                    raise CalibrationError(
                        f"calibration sample {index} failed at {_where(f.node)}: {type(f.exc).__name__}: {f.exc}"
                    ) from f.exc
                if any(torch.isnan(t).any() for t in _float_tensors(list(outputs))):
                    raise CalibrationError(
                        f"the fp32 model gives NaN in its outputs on calibration sample {index}; the first NaN "
                        f"appears at {_where(recorder.first_nan)}. Calibration needs samples the model handles."
                    )
        for node in gm.graph.nodes:
            if node in stats:
                record(node).range = stats[node].finish()
            elif node.op == "get_attr" and _float_tensors(node.meta.get("val")):
                st = _Stats()
                st.update(attr_of(gm, node.target))
                record(node).range = st.finish()
        # Views hold their input's values: copy the range forward (graph order is topological).
        for node in gm.graph.nodes:
            if node.op == "call_function" and node not in stats and op_name(node) in _SAME_VALUES:
                source = node.args[0]
                if isinstance(source, torch.fx.Node):
                    record(node).range = record(source).range
        graph_record(gm).calib_samples = len(self.samples)
        return PassResult(modified=True, stats={"samples": len(self.samples), "values": len(stats)})
