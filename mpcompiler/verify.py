"""Accuracy against fp32: the model's own outputs on samples held back from calibration.

compile() measures the FX artifact with it and export_onnx() the ONNX one, on the same samples.
The metric is the relative L2 error of each float output, summed over all samples:
sqrt(sum ||out - ref||^2) / sqrt(sum ||ref||^2).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.fx
import torch.utils._pytree as pytree

from mpcompiler.capture import Sample, eval_mode, strict_fp32, to_device
from mpcompiler.errors import CalibrationError


@dataclass(frozen=True)
class Accuracy:
    """Relative L2 error vs fp32 per float output, on ``samples`` samples."""

    per_output: dict[str, float]
    samples: int
    held_out: bool  # False when there were too few samples to hold any back from calibration

    @property
    def max(self) -> float:
        return max(self.per_output.values(), default=0.0)

    def to_dict(self) -> dict:
        return {**asdict(self), "max": self.max, "metric": "rel_l2"}

    def __str__(self) -> str:
        where = "held-out" if self.held_out else "calibration (none held out)"
        outs = ", ".join(f"{k} {v:.2e}" for k, v in self.per_output.items())
        return f"rel. L2 error vs fp32 on {self.samples} {where} samples: {outs}"


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
    err = {}
    for i, name in enumerate(names):
        num = den = 0.0
        for out, ref in zip(outputs, refs, strict=True):
            o, r = out[i], ref[i]
            if r is None or not r.dtype.is_floating_point:
                continue
            o, r = torch.as_tensor(o).double().cpu(), r.double()
            num += float((o - r).pow(2).sum())
            den += float(r.pow(2).sum())
        if den > 0:
            err[name] = (num / den) ** 0.5
    return err


def measure(fn: Callable, samples: Sequence[Sample], refs, names, *, device, held_out: bool) -> Accuracy:
    """Run ``fn(*args, **kwargs)`` on each sample and compare its flat outputs with ``refs``."""
    outs = []
    with torch.no_grad():
        for args, kwargs in samples:
            args, kwargs = to_device((args, kwargs), device)
            outs.append(flat_outputs(fn(*args, **kwargs)))
    return Accuracy(rel_l2(outs, refs, names), samples=len(samples), held_out=held_out)
