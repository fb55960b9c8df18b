"""Accuracy against fp32: the model's own outputs on samples held back from calibration.

compile() measures the FX artifact with it and export_onnx() the ONNX one, on the same samples.
The metric is the relative L2 error of each float output, summed over all samples:
sqrt(sum ||out - ref||^2) / sqrt(sum ||ref||^2).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields

import torch
import torch.fx
import torch.utils._pytree as pytree

from mpcompiler.errors import CalibrationError, OptionError
from mpcompiler.samples import Sample, eval_mode, strict_fp32, to_device


@dataclass(frozen=True)
class Metric:
    """How outputs are judged against fp32's: ``metric(outputs, refs, samples)`` (per sample, the flat
    outputs, and the samples they came from) gives a value that ``meets`` a tolerance when at most it
    (errors) or at least it (similarities). Only the language-model metrics read the samples."""

    name: str
    fn: Callable[..., float]
    higher_is_better: bool = False
    reads_samples: bool = False  # fn(outputs, refs, samples): the tokens a language model predicts
    given: bool = False  # the caller's own callable: its failure is named as its own, not as the pass's

    def __call__(self, outputs: Sequence[Sequence], refs: Sequence[Sequence], samples=()) -> float:
        if not self.given:
            return float(self.fn(outputs, refs, samples) if self.reads_samples else self.fn(outputs, refs))
        try:
            return float(self.fn(outputs, refs))
        except Exception as exc:
            raise OptionError(
                f"metric {self.name} failed on the held-out outputs ({type(exc).__name__}: {exc}); it is called as "
                "metric(outputs, refs) with each sample's flat output tensors and fp32's, and returns a number"
            ) from exc

    @property
    def relation(self) -> str:
        return ">=" if self.higher_is_better else "<="

    def meets(self, value: float, tolerance: float) -> bool:
        return value >= tolerance if self.higher_is_better else value <= tolerance


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


def _next_tokens(outputs, refs, samples):
    """Per sample: the compiled and fp32 logits of each real position that predicts a real next token
    ([N, vocab] each), and those tokens ([N]): a language model's sequences, left-padded."""
    for out, ref, (_, kwargs) in zip(outputs, refs, samples, strict=True):
        ids, mask = kwargs["input_ids"].cpu(), kwargs["attention_mask"].cpu().bool()
        keep = mask[:, :-1] & mask[:, 1:]
        yield torch.as_tensor(out[0]).cpu()[:, :-1][keep].double(), ref[0][:, :-1][keep].double(), ids[:, 1:][keep]


def _nll(outputs, refs, samples) -> tuple[float, float]:
    """Mean negative log-likelihood of the next tokens: (compiled, fp32)."""
    total = ref_total = count = 0.0
    for out, ref, target in _next_tokens(outputs, refs, samples):
        total += float(torch.nn.functional.cross_entropy(out, target, reduction="sum"))
        ref_total += float(torch.nn.functional.cross_entropy(ref, target, reduction="sum"))
        count += len(target)
    if not count:
        raise CalibrationError("the held-out text has no next token to predict: give prompts of 2 tokens or more")
    return total / count, ref_total / count


def perplexity_increase(outputs, refs, samples) -> float:
    """The compiled model's perplexity on the samples' text over fp32's, less 1 (0.005: 0.5% higher)."""
    nll, ref = _nll(outputs, refs, samples)
    return math.exp(nll - ref) - 1


def greedy_agreement(outputs, refs, samples) -> float:
    """Share of the text's positions where the compiled model's most likely next token is fp32's."""
    agree = total = 0
    for out, ref, _ in _next_tokens(outputs, refs, samples):
        agree += int((out.argmax(-1) == ref.argmax(-1)).sum())
        total += len(out)
    return agree / total


METRICS = {
    "rel_l2": Metric("rel_l2", _max_rel_l2),
    "cosine": Metric("cosine", _min_cosine, higher_is_better=True),
    "top1": Metric("top1", _top1, higher_is_better=True),
    "perplexity": Metric("perplexity", perplexity_increase, reads_samples=True),
    "greedy": Metric("greedy", greedy_agreement, higher_is_better=True, reads_samples=True),
}


@dataclass(frozen=True)
class Accuracy:
    """Relative L2 error vs fp32 per float output, on ``samples`` samples; with a tolerance, the
    metric it was judged by and whether it was met."""

    per_output: dict[str, float]
    samples: int
    held_out: bool  # False when there were too few samples to hold any back from calibration
    rows: int | None = None  # the samples' batch rows together (a sample may be a batch)
    metric: str = "rel_l2"
    value: float | None = None  # the metric's value (compile(tolerance=...) only)
    tolerance: float | None = None
    met: bool | None = None
    # a language model's text (compile(max_seq=...)): perplexity of fp32 and of the compiled model,
    # and the share of positions where both predict the same next token
    perplexity_fp32: float | None = None
    perplexity: float | None = None
    greedy_agreement: float | None = None
    # with a tolerance: how many other held-out samples the search judged its plans on (0: too few were
    # held out to keep them apart, and these are the search's own)
    searched: int | None = None

    @property
    def max(self) -> float:
        return max(self.per_output.values(), default=0.0)

    def to_dict(self) -> dict:
        return {**asdict(self), "max": self.max}

    @classmethod
    def from_dict(cls, data: dict) -> Accuracy:
        """The inverse of :meth:`to_dict` (fields a report.json of an older version lacks take defaults)."""
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})

    def __str__(self) -> str:
        where = "held-out" if self.held_out else "calibration (none held out)"
        outs = ", ".join(f"{k} {v:.2e}" for k, v in self.per_output.items())
        rows = f" ({self.rows} rows)" if self.rows not in (None, self.samples) else ""
        search = ""
        if self.searched is not None and self.held_out:
            search = (
                f", apart from the {self.searched} the tolerance search judged plans on"
                if self.searched
                else ", the tolerance search's own (hold out 2 or more to keep them apart)"
            )
        text = (
            f"rel. L2 error vs fp32 on {self.samples} {where} sample{'s' if self.samples != 1 else ''}{rows}"
            f"{search}: {outs}"
        )
        if self.perplexity is not None:
            text += (
                f"; perplexity {self.perplexity:.4g} vs fp32's {self.perplexity_fp32:.4g} "
                f"({self.perplexity / self.perplexity_fp32 - 1:+.2%}), greedy agreement {self.greedy_agreement:.2%}"
            )
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


def _rows(samples: Sequence[Sample]) -> int:
    """Batch rows over the samples: each sample's first tensor's leading dim (1 for a scalar)."""
    firsts = (next((t for t in pytree.tree_leaves(s) if isinstance(t, torch.Tensor)), None) for s in samples)
    return sum(t.shape[0] if t is not None and t.dim() else 1 for t in firsts)


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
    language_model: bool = False,
    searched: int | None = None,
) -> Accuracy:
    """Run ``fn(*args, **kwargs)`` on each sample and compare its flat outputs with ``refs`` (and, for a
    language model, its perplexity and next-token agreement on the samples' text)."""
    outs = []
    with torch.no_grad():
        for args, kwargs in samples:
            args, kwargs = to_device((args, kwargs), device)
            outs.append(flat_outputs(fn(*args, **kwargs)))
    accuracy = Accuracy(
        rel_l2(outs, refs, names), samples=len(samples), held_out=held_out, rows=_rows(samples), searched=searched
    )
    if language_model:
        nll, ref = _nll(outs, refs, samples)
        accuracy = dataclasses.replace(
            accuracy,
            perplexity=math.exp(nll),
            perplexity_fp32=math.exp(ref),
            greedy_agreement=greedy_agreement(outs, refs, samples),
        )
    if tolerance is None:
        return accuracy
    value = metric(outs, refs, samples)
    return dataclasses.replace(
        accuracy, metric=metric.name, value=value, tolerance=tolerance, met=metric.meets(value, tolerance)
    )
