"""Accuracy against fp32: the model's own outputs on samples held back from calibration.

compile() measures the FX artifact with it and export_onnx() the ONNX one, on the same samples.
The metric is the relative L2 error of each float output, summed over all samples:
sqrt(sum ||out - ref||^2) / sqrt(sum ||ref||^2).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.fx
import torch.utils._pytree as pytree

from mpcompiler.capture import Sample, eval_mode, strict_fp32, to_device
from mpcompiler.errors import CalibrationError


@dataclass(frozen=True)
class Metric:
    """How outputs are judged against fp32's: ``metric(outputs, refs)`` (per sample, the flat outputs)
    gives a value that ``meets`` a tolerance when at most it (errors) or at least it (similarities)."""

    name: str
    fn: Callable[[Sequence[Sequence], Sequence[Sequence]], float]
    higher_is_better: bool = False

    def __call__(self, outputs: Sequence[Sequence], refs: Sequence[Sequence]) -> float:
        return float(self.fn(outputs, refs))

    @property
    def relation(self) -> str:
        return ">=" if self.higher_is_better else "<="

    def meets(self, value: float, tolerance: float) -> bool:
        return value >= tolerance if self.higher_is_better else value <= tolerance

    def key(self, value: float) -> float:
        """Sort key: smaller is better."""
        return -value if self.higher_is_better else value


def _float_pairs(outputs, refs, i: int):
    for out, ref in zip(outputs, refs, strict=True):
        r = ref[i]
        if isinstance(r, torch.Tensor) and r.dtype.is_floating_point:
            yield torch.as_tensor(out[i]).double().cpu(), r.double()


def _rel_l2(outputs, refs, i: int) -> float | None:
    num = den = 0.0
    for o, r in _float_pairs(outputs, refs, i):
        num += float((o - r).pow(2).sum())
        den += float(r.pow(2).sum())
    return (num / den) ** 0.5 if den > 0 else None


def _max_rel_l2(outputs, refs) -> float:
    errs = [_rel_l2(outputs, refs, i) for i in range(len(refs[0]))]
    return max((e for e in errs if e is not None), default=0.0)


def _min_cosine(outputs, refs) -> float:
    """The lowest cosine similarity of any float output to its reference, over samples (flattened)."""
    sims = [
        float(torch.nn.functional.cosine_similarity(o.flatten(), r.flatten(), dim=0))
        for i in range(len(refs[0]))
        for o, r in _float_pairs(outputs, refs, i)
    ]
    return min(sims, default=1.0)


def _top1(outputs, refs) -> float:
    """Share of rows whose argmax over the last dim of the first float output agrees with fp32's."""
    first = next(i for i in range(len(refs[0])) if any(True for _ in _float_pairs(outputs, refs, i)))
    agree = total = 0
    for o, r in _float_pairs(outputs, refs, first):
        agree += int((o.argmax(-1) == r.argmax(-1)).sum())
        total += r.argmax(-1).numel()
    return agree / total


METRICS = {
    "rel_l2": Metric("rel_l2", _max_rel_l2),
    "cosine": Metric("cosine", _min_cosine, higher_is_better=True),
    "top1": Metric("top1", _top1, higher_is_better=True),
}


@dataclass(frozen=True)
class Accuracy:
    """Relative L2 error vs fp32 per float output, on ``samples`` samples; with a tolerance, the
    metric it was judged by and whether it was met."""

    per_output: dict[str, float]
    samples: int
    held_out: bool  # False when there were too few samples to hold any back from calibration
    metric: str = "rel_l2"
    value: float | None = None  # the metric's value (compile(tolerance=...) only)
    tolerance: float | None = None
    met: bool | None = None

    @property
    def max(self) -> float:
        return max(self.per_output.values(), default=0.0)

    def to_dict(self) -> dict:
        return {**asdict(self), "max": self.max}

    def __str__(self) -> str:
        where = "held-out" if self.held_out else "calibration (none held out)"
        outs = ", ".join(f"{k} {v:.2e}" for k, v in self.per_output.items())
        text = f"rel. L2 error vs fp32 on {self.samples} {where} samples: {outs}"
        if self.tolerance is not None:
            verdict = "met" if self.met else "NOT met"
            text += f"; tolerance {self.metric} {self.tolerance:g}: {self.value:.4g}, {verdict}"
        return text


def _key(k) -> str:
    if isinstance(k, pytree.MappingKey):
        return str(k.key)
    if isinstance(k, pytree.SequenceKey):
        return str(k.idx)
    return str(getattr(k, "name", k))  # GetAttrKey of a dataclass-like output


def output_names(gm: torch.fx.GraphModule) -> list[str]:
    """Names of the graph's flat outputs: ``last_hidden_state`` (a ModelOutput or dict), ``output``
    (a lone tensor), ``output_0`` (a tuple), ``pair.1`` (nested)."""
    spec = gm.graph._codegen.pytree_info.out_spec
    leaves = pytree.tree_flatten_with_path(pytree.tree_unflatten(list(range(spec.num_leaves)), spec))[0]
    names = []
    for path, _ in leaves:
        name = ".".join(_key(k) for k in path)
        names.append(f"output_{name}" if not path or isinstance(path[0], pytree.SequenceKey) else name)
    return ["output"] if names == ["output_"] else names


def flat_outputs(out) -> list[torch.Tensor | None]:
    return [t if isinstance(t, torch.Tensor) else None for t in pytree.tree_leaves(out)]


def references(model: torch.nn.Module, samples: Sequence[Sample], device: torch.device) -> list[list]:
    """The fp32 model's flat outputs on each sample (eval mode, no grad), on the CPU."""
    refs = []
    with eval_mode(model), strict_fp32(), torch.no_grad():
        for index, (args, kwargs) in enumerate(samples):
            args, kwargs = to_device((args, kwargs), device)
            try:
                out = model(*args, **kwargs)
            except Exception as exc:
                raise CalibrationError(
                    f"validation sample {index} fails in the fp32 model: {type(exc).__name__}: {exc}"
                ) from exc
            refs.append([t.detach().cpu() if t is not None else None for t in flat_outputs(out)])
    return refs


def rel_l2(outputs: Sequence[Sequence], refs: Sequence[Sequence], names: Sequence[str]) -> dict[str, float]:
    """Per output name: relative L2 error summed over samples (float outputs only)."""
    errs = {name: _rel_l2(outputs, refs, i) for i, name in enumerate(names)}
    return {name: e for name, e in errs.items() if e is not None}


def measure(
    fn: Callable,
    samples: Sequence[Sample],
    refs,
    names,
    *,
    device,
    held_out: bool,
    metric: Metric | None = None,
    tolerance: float | None = None,
) -> Accuracy:
    """Run ``fn(*args, **kwargs)`` on each sample and compare its flat outputs with ``refs``."""
    outs = []
    with torch.no_grad():
        for args, kwargs in samples:
            args, kwargs = to_device((args, kwargs), device)
            outs.append(flat_outputs(fn(*args, **kwargs)))
    accuracy = Accuracy(rel_l2(outs, refs, names), samples=len(samples), held_out=held_out)
    if tolerance is None:
        return accuracy
    value = metric(outs, refs)
    return dataclasses.replace(
        accuracy, metric=metric.name, value=value, tolerance=tolerance, met=metric.meets(value, tolerance)
    )
