"""The report: what was decided for every node, and why (``compiled.report``, ``report.json``)."""

from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.fx

from mpcompiler import dtypes
from mpcompiler.accuracy import Accuracy
from mpcompiler.files import write_atomic
from mpcompiler.ir import META_KEY, OpClass, Rule, graph_record, op_name
from mpcompiler.pass_manager import PassRun


@dataclass(frozen=True)
class NodeDecision:
    """One node of the compiled graph as the report shows it."""

    name: str
    op: str
    module_path: str
    dtype: str | None  # planned (and, after insert_casts, actual) dtype of its float value
    math_dtype: str | None  # set where the kernel computes wider than its I/O
    op_class: str | None
    rule: str
    reason: str
    range: dict | None
    inner: dict | None  # peak of what the op computes inside (InnerRange), for norms, reductions, matmuls
    inserted_cast: bool  # a cast mpcompiler inserted
    fused: str  # the fusion that made the node, if any
    sensitivity: float | None  # rel. L2 output error it would cause alone in low precision (tolerance search)
    local_error: float | None  # its own output's rel. error in low precision on fp32 inputs
    flops: int | None  # matmul/conv/attention FLOPs per call
    inserted: bool | None = None  # mpcompiler added it (a cast, a clamp); None in reports written before 2026-12-06
    fp8: dict | None = None  # compile(dtype="fp8"): its GEMM's e4m3 scales (Fp8Scales), if it has one
    fp8_reason: str | None = None  # why it is an e4m3 GEMM, or why a linear in a low dtype is not
    fp8_saturated: float | None = None  # share of its input's held-out values past the calibrated absmax


@dataclass
class Report:
    """Per-node precision decisions, with summary helpers; ``str(report)`` is a readable summary."""

    dtype: str  # the low dtype compile() was asked for
    calib_samples: int
    nodes: list[NodeDecision]
    passes: list[dict] = field(default_factory=list)
    accuracy: Accuracy | None = None  # the compiled module vs fp32 on held-out samples
    search: dict | None = None  # what the tolerance search did (SearchLog), if it ran
    fallback: str | None = None  # dtype="auto": the dtype nodes past the low dtype's range run in (bfloat16)
    fp8: bool = False  # dtype="fp8": linears may run as e4m3 GEMMs (NodeDecision.fp8)

    @classmethod
    def from_graph(cls, gm: torch.fx.GraphModule, runs: list[PassRun], accuracy: Accuracy | None = None) -> Report:
        nodes = []
        for n in gm.graph.nodes:
            rec = n.meta.get(META_KEY)
            if n.op != "call_function" or rec is None:
                continue
            nodes.append(
                NodeDecision(
                    name=n.name,
                    op=op_name(n),
                    module_path=rec.module_path,
                    dtype=dtypes.name(rec.dtype),
                    math_dtype=dtypes.name(rec.math_dtype),
                    op_class=rec.op_class.value if rec.op_class else None,
                    rule=str(rec.rule),
                    reason=rec.reason,
                    range=rec.range.to_dict() if rec.range else None,
                    inner=rec.inner.to_dict() if rec.inner else None,
                    inserted_cast=rec.inserted and rec.rule is Rule.CAST,
                    inserted=rec.inserted,
                    fused=rec.fused,
                    sensitivity=rec.sensitivity,
                    local_error=rec.local_error,
                    flops=rec.flops,
                    fp8=rec.fp8.to_dict() if rec.fp8 else None,
                    fp8_reason=rec.fp8_reason or None,
                    fp8_saturated=rec.fp8_saturated,
                )
            )
        g = graph_record(gm)
        passes = [
            {"index": r.index, "name": r.name, "modified": r.result.modified, "ms": round(r.ms, 2), **r.result.stats}
            for r in runs
        ]
        return cls(
            dtype=dtypes.name(g.dtype),
            calib_samples=g.calib_samples,
            nodes=nodes,
            passes=passes,
            accuracy=accuracy,
            search=g.search.to_dict() if g.search else None,
            fallback=dtypes.name(g.fallback),
            fp8=g.fp8,
        )

    def ops(self) -> list[NodeDecision]:
        """Float-valued ops of the model (the casts and clamps mpcompiler inserted left out)."""
        return [n for n in self.nodes if n.dtype is not None and not (n.inserted or n.inserted_cast)]

    def counts(self, op_class: str | None = None) -> dict[str, int]:
        """Number of float-valued ops per dtype, optionally of one op class ("low", "follow", ...)."""
        return dict(Counter(n.dtype for n in self.ops() if op_class is None or n.op_class == op_class))

    def casts(self) -> int:
        return sum(n.inserted_cast for n in self.nodes)

    def kept_high(self) -> list[NodeDecision]:
        """Ops not in the low dtype, each with its reason."""
        return [n for n in self.ops() if n.dtype != self.dtype]

    def culprits(self, n: int = 10) -> list[NodeDecision]:
        """The ``n`` ops that would cost the most accuracy in low precision, most first (each with its
        module path, dtype and reason), as the tolerance search of compile(tolerance=...) measured them.
        Empty where the search needed no ranking: every op low met the tolerance at its first evaluation."""
        if self.search is None:
            raise ValueError("no sensitivity was measured: compile with tolerance=... to rank culprits")
        measured = [d for d in self.ops() if d.sensitivity is not None]
        return sorted(measured, key=lambda d: -d.sensitivity)[:n]

    def low_flop_share(self) -> float | None:
        """Share of the matmul/conv/attention FLOPs that run in a low-precision dtype (None if not counted)."""
        counted = [d for d in self.ops() if d.flops]
        total = sum(d.flops for d in counted)
        low = sum(d.flops for d in counted if d.dtype in ("float16", "bfloat16"))
        return low / total if total else None

    def plot(self, path: str | Path) -> Path:
        """Write a PNG: per op in graph order, its sensitivity and its calibrated range (needs matplotlib)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as exc:
            raise ImportError("report.plot() needs matplotlib: pip install 'mpcompiler[plot]'") from exc
        ops = self.ops()
        index = {id(d): i for i, d in enumerate(ops)}
        colors = {"float16": "tab:blue", "bfloat16": "tab:green", "float32": "tab:red"}
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(8, len(ops) / 25), 6), sharex=True)
        for dtype, color in colors.items():  # one series per dtype: the legend names them
            mine = [i for i, d in enumerate(ops) if (d.dtype if d.dtype in colors else "float32") == dtype]
            measured = [i for i in mine if ops[i].sensitivity is not None]  # the search's candidates
            if measured:
                top.scatter(measured, [ops[i].sensitivity for i in measured], c=color, s=6, label=dtype)
            ranges = [ops[i].range["absmax"] if ops[i].range else 0 for i in mine]
            if mine:
                bottom.scatter(mine, ranges, c=color, s=6, label=dtype)
        if any(d.sensitivity is not None for d in ops):
            for d in self.culprits(5):  # the top culprits, by module path
                top.annotate(d.module_path or d.name, (index[id(d)], d.sensitivity), fontsize=7, rotation=20,
                             xytext=(4, 4), textcoords="offset points")  # fmt: skip
            top.legend(loc="best", fontsize=8, title="planned dtype", title_fontsize=8)
        top.set_yscale("log")
        top.set_ylabel("sensitivity (rel. L2 at outputs)")
        top.set_title("each op's error at the outputs when only it runs low (compile(tolerance=...))")
        bottom.axhline(65504, color="gray", linestyle="--", linewidth=0.8, label="fp16 max (65504)")
        bottom.set_yscale("symlog", linthresh=1e-6)
        bottom.set_ylabel("calibrated |x| max")
        bottom.set_xlabel("op, in graph order")
        bottom.legend(loc="best", fontsize=8)
        fig.tight_layout()
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=100)
        plt.close(fig)
        return write_atomic(path, png.getvalue())

    def to_dict(self) -> dict:
        return {
            "dtype": self.dtype,
            "fallback": self.fallback,
            "fp8": self.fp8,
            "calib_samples": self.calib_samples,
            "counts": self.counts(),
            "casts": self.casts(),
            "accuracy": self.accuracy.to_dict() if self.accuracy else None,
            "search": self.search,
            "low_flop_share": self.low_flop_share(),
            "passes": self.passes,
            "nodes": [asdict(n) for n in self.nodes],
        }

    def save(self, path: str | Path) -> Path:
        return write_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Report:
        """Read a report written by :meth:`save` (``report.json``). A file that is not one is a ValueError."""
        data = json.loads(Path(path).read_text())
        if isinstance(data, dict) and "target" in data and "dtype" not in data:  # written before 2026-12-06
            data["dtype"] = data.pop("target")
        if not isinstance(data, dict) or not {"dtype", "calib_samples", "nodes"} <= data.keys():
            raise ValueError(f"{path} is not an mpcompiler report.json (no dtype, calib_samples and nodes)")
        # keys a newer mpcompiler adds are left out; a node's field an older one lacked reads as None
        nodes = [NodeDecision(**{f.name: n.get(f.name) for f in fields(NodeDecision)}) for n in data["nodes"]]
        accuracy = data.get("accuracy")
        if accuracy:  # "max" is derived, not a field
            accuracy = Accuracy.from_dict(accuracy)
        return cls(
            dtype=data["dtype"],
            calib_samples=data["calib_samples"],
            nodes=nodes,
            passes=data.get("passes") or [],
            accuracy=accuracy or None,
            search=data.get("search"),
            fallback=data.get("fallback"),
            fp8=bool(data.get("fp8")),
        )

    def summary(self) -> list[str]:
        """The summary's lines without the per-node ones: the dtype, ops per dtype, accuracy, search."""
        counts = ", ".join(f"{dtypes.short(getattr(torch, d))}: {c}" for d, c in sorted(self.counts().items()))
        low = self.counts(OpClass.LOW.value)
        lines = [
            f"mpcompiler report: dtype {self.dtype}"
            + (f" ({self.fallback} where it overflows or underflows)" if self.fallback else "")
            + f", {self.calib_samples} calibration samples",
            f"  ops per dtype: {counts}; compute-bound ops: {low}; casts inserted: {self.casts()}",
        ]
        if self.fp8:
            gemms = [n for n in self.ops() if n.fp8_reason]  # the linears a level below their dtype could go
            line = f"  fp8 (e4m3) GEMMs: {sum(n.fp8 is not None for n in gemms)} of {len(gemms)} linears"
            saturated = [n for n in gemms if n.fp8_saturated is not None]
            if saturated:  # measured by compile() on the held-out samples
                worst = max(saturated, key=lambda n: n.fp8_saturated)
                where = f"at most {worst.fp8_saturated:.3%} ({worst.module_path or worst.name})"
                line += f"; held-out inputs past the calibrated absmax: {where if worst.fp8_saturated else 'none'}"
            lines.append(line)
        if self.accuracy is not None:
            lines.append(f"  {self.accuracy}")
        if self.search is not None:
            s = self.search
            stages = []  # dtype="fp8": its first stage; the second runs only where the first cannot meet it
            if s.get("fp8_candidates"):
                with_ = f" and {s['fp8_kept_with']} more with a linear of their input" if s.get("fp8_kept_with") else ""
                stages.append(f"{s['fp8_kept']} of {s['fp8_candidates']} fp8 linears kept in {self.dtype}{with_} "
                              f"({len(s['fp8_evaluations'])} whole-model evaluations)")  # fmt: skip
            if s["evaluations"]:
                stages.append(f"{s['kept_high']} of {s['candidates']} low-precision ops kept high "
                              f"({len(s['evaluations'])} whole-model evaluations)")  # fmt: skip
            lines.append(
                f"  tolerance search: {', then '.join(stages)}; {s['sensitivity_passes']} sensitivity passes, "
                f"{s['wall_s']:.1f} s; FLOPs in low precision: {self.low_flop_share():.1%}"
            )
        return lines

    def __str__(self) -> str:
        lines = self.summary()
        if self.search is not None:
            lines += [
                f"    culprit %{d.name:<22} {d.dtype:<8} sensitivity {d.sensitivity:.2g} @ {d.module_path or '-'}"
                for d in self.culprits(5)
            ]
        high = self.kept_high()
        if high:
            lines.append(f"  {len(high)} ops not in {self.dtype}:")
            lines += [f"    %{n.name:<24} {n.dtype:<8} @ {n.module_path or '-'}: {n.reason}" for n in high[:40]]
            if len(high) > 40:
                lines.append(f"    ... {len(high) - 40} more in report.json")
        return "\n".join(lines)
