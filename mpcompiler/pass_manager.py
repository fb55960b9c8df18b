"""The pass manager: runs an explicit, ordered list of passes over the IR, dumping and checking it.

A pass rewrites the graph module in place and returns a :class:`PassResult`. After each pass the
manager writes ``NN_<pass>.txt`` to ``dump_dir`` when the pass changed something (every pass in
debug runs), and in debug runs checks the IR (``graph.lint()``, a record on every node, the graph
re-typed through fake tensors, the precision plan realised). A failure raises :class:`PassError`
naming the pass and the passes before it, with the IR it failed on written to a file.
"""

from __future__ import annotations

import re
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.fx
from torch._dispatch.python import enable_python_dispatcher
from torch._guards import detect_fake_mode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from mpcompiler import dtypes
from mpcompiler.errors import MpCompilerError, PassError
from mpcompiler.files import write_atomic
from mpcompiler.ir import META_KEY, float_dtype, graph_record
from mpcompiler.printer import format_graph
from mpcompiler.rewrite import format_reasons


def progress(items=None, what: str = "", total: int | None = None, unit: str = "sample", show: bool = True):
    """tqdm's bar for a long step, ``mpcompiler: <what>``: shown on a terminal only (``disable=None``),
    never when ``show`` is False, and gone when the step ends."""
    return tqdm(items, desc=f"mpcompiler: {what}", total=total, unit=unit, disable=None if show else True, leave=False)


@dataclass(frozen=True)
class PassResult:
    modified: bool
    stats: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, Counter] = field(default_factory=dict)  # per rewrite rule, why it did not fire (counts)


def _float_ops(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and float_dtype(n.meta.get("val")) is not None]


# What a pass may require of the graph it is given, or ensure of the graph it leaves: each a description and
# a check of the graph itself (not bookkeeping of which passes ran, which a copy of the graph would not carry).
FACTS: dict[str, tuple[str, Callable[[torch.fx.GraphModule], bool]]] = {
    "ranges": (
        "calibrated ranges (calibrate_ranges)",
        lambda gm: not _float_ops(gm) or any(getattr(n.meta.get(META_KEY), "range", None) for n in _float_ops(gm)),
    ),
    "plan": (
        "a precision plan: a dtype on every float op (assign_precision)",
        lambda gm: all(getattr(n.meta.get(META_KEY), "dtype", None) is not None for n in _float_ops(gm)),
    ),
    "casts": ("the plan's casts inserted (insert_casts)", lambda gm: graph_record(gm).casts_inserted),
    "kv_cache": (
        "a static KV cache in its buffers (insert_kv_cache)",
        lambda gm: any(name.startswith("kv_cache_") for name, _ in gm.named_buffers()),
    ),
}


class Pass:
    """A graph rewrite. Subclasses take keyword-only options in ``__init__`` and implement ``call``;
    everyone runs a pass with :meth:`run`, which does the common ending. A pass that adds, removes or
    rewires nodes says so with ``rewrites_graph``: the ending then regenerates the module's code and re-types
    the graph; a pass that only writes records (ranges, a plan) needs neither. ``requires`` and ``ensures``
    name :data:`FACTS` of the graph before and after it: a pass manager refuses to run a pass whose
    requirement the graph lacks (a pipeline listed in the wrong order), and in debug runs checks what it
    ensures."""

    rewrites_graph = False
    requires: tuple[str, ...] = ()
    ensures: tuple[str, ...] = ()

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        raise NotImplementedError

    def run(self, gm: torch.fx.GraphModule) -> PassResult:
        result = self.call(gm)
        if result.modified and self.rewrites_graph:
            gm.recompile()  # dynamo maps the generated code's lines to nodes
            if all("val" in n.meta for n in gm.graph.nodes if n.op == "placeholder"):  # a typed graph stays typed
                retype(gm)
        return result

    @classmethod
    def name(cls) -> str:
        """``InsertCasts`` -> ``insert_casts``: the pass's file, class and dump share one name."""
        return re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).lower()


@dataclass(frozen=True)
class PassRun:
    index: int
    name: str
    result: PassResult
    ms: float


def retype(gm: torch.fx.GraphModule) -> None:
    """Re-run shape/dtype propagation with the export's fake tensors (dynamic dims kept).

    Refreshes every node's ``meta["val"]``; raises if the graph no longer type-checks (a kernel
    refusing mixed dtypes, say).
    """
    inputs = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
    mode = detect_fake_mode(inputs) or detect_fake_mode([n.meta.get("val") for n in gm.graph.nodes])  # no input
    # Shapes and dtypes do not depend on the attention backend; CUDA's fused ones need concrete
    # sizes to pick a kernel (fp32 SDPA with dynamic dims fails on torch 2.11), the math one does not.
    # Composite ops (linear, matmul) decompose through their Python rules, as under torch.export:
    # some C++ ones read sizes that are symbolic here (torch 2.11's matmul calls numel()).
    with mode, sdpa_kernel(SDPBackend.MATH), enable_python_dispatcher():
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*inputs)


def check_ir(gm: torch.fx.GraphModule) -> None:
    """Check the IR's invariants; raises AssertionError/RuntimeError naming the broken node."""
    gm.graph.lint()
    for node in gm.graph.nodes:
        if node.op != "output" and META_KEY not in node.meta:
            raise AssertionError(f"node %{node.name} has no mpcompiler record")
    retype(gm)
    if graph_record(gm).casts_inserted:
        for node in gm.graph.nodes:
            want = node.meta[META_KEY].dtype if node.op != "output" else None
            got = float_dtype(node.meta.get("val"))
            if want is not None and got is not None and want != got and node.op == "call_function":
                raise AssertionError(
                    f"node %{node.name} is planned {dtypes.short(want)} but computes {dtypes.short(got)}"
                )


class PassManager:
    def __init__(self, passes: list[Pass], *, dump_dir: str | Path | None = None, debug: bool = False):
        self.passes = passes
        self.dump_dir = Path(dump_dir) if dump_dir is not None else None
        self.debug = debug

    def run(self, gm: torch.fx.GraphModule) -> list[PassRun]:
        runs: list[PassRun] = []
        if self.dump_dir is not None:
            _dump(self.dump_dir, gm, "00_capture.txt", "after 00 capture")
        for index, p in enumerate(self.passes, start=1):
            name = p.name()
            start = time.perf_counter()
            before = ", ".join(["capture"] + [r.name for r in runs])
            missing = [FACTS[fact][0] for fact in p.requires if not FACTS[fact][1](gm)]
            if missing:
                raise PassError(
                    f"pass {index:02d} {name} needs {'; '.join(missing)}: the graph after {before} has none"
                )
            try:
                result = p.run(gm)
                if self.debug:
                    check_ir(gm)
                    for fact in p.ensures:
                        if not FACTS[fact][1](gm):
                            raise AssertionError(f"{name} did not leave {FACTS[fact][0]}")
            except MpCompilerError:
                raise  # already says what is wrong with the model, the data or an option
            except Exception as exc:
                where = self._write_failed(gm, index, name)
                raise PassError(
                    f"pass {index:02d} {name} failed (after {before}): {type(exc).__name__}: {exc}\n"
                    f"The IR it failed on is in {where}"
                ) from exc
            ms = (time.perf_counter() - start) * 1e3
            runs.append(PassRun(index, name, result, ms))
            if self.dump_dir is not None and (result.modified or self.debug):
                stats = "".join(f"; {k}={v}" for k, v in result.stats.items())
                state = "changed" if result.modified else "unchanged"
                _dump(
                    self.dump_dir,
                    gm,
                    f"{index:02d}_{name}.txt",
                    f"after {index:02d} {name} ({state}{stats}; {ms:.1f} ms)",
                    format_reasons(result.reasons) if self.debug else [],
                )
        return runs

    def _write_failed(self, gm, index: int, name: str) -> Path:
        folder = self.dump_dir or Path(tempfile.mkdtemp(prefix="mpcompiler-"))
        filename = f"{index:02d}_{name}.failed.txt"
        try:
            return _dump(folder, gm, filename, f"IR when {index:02d} {name} failed")
        except Exception:  # the graph may be too broken to print; say so rather than mask the error
            return write_atomic(folder / filename, "\n".join(map(str, gm.graph.nodes)) + "\n")


def _dump(folder: Path, gm: torch.fx.GraphModule, filename: str, title: str, notes: list[str] = ()) -> Path:
    footer = "".join(f"// {line}\n" for line in notes)
    return write_atomic(folder / filename, format_graph(gm, title) + footer)
