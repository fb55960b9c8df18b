"""Small models and measures shared by the tests."""

from __future__ import annotations

import os
import re

import torch
import torch.fx
import torch.nn as nn

import mpcompiler
from mpcompiler.api import Options, pipeline
from mpcompiler.capture import capture
from mpcompiler.pass_manager import PassManager, PassResult
from mpcompiler.printer import format_graph
from mpcompiler.samples import collect_samples

# The rel. L2 error against fp32 a compiled model meets in these tests, by its plan's low dtype: the one
# table (conftest.py is loaded by pytest under its own name; importing it from a test would load it twice).
TOL = {torch.float16: 5e-3, torch.bfloat16: 3e-2}


def rel_err(got, ref) -> float:
    """Relative L2 error of got vs ref (fp32 math)."""
    got, ref = got.detach().double(), ref.detach().double()
    return float((got - ref).norm() / ref.norm())


class Tiny(nn.Module):
    """linear -> layer_norm -> relu -> linear -> softmax: one op of each class."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.ln = nn.LayerNorm(32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x):
        return torch.softmax(self.fc2(torch.relu(self.ln(self.fc1(x)))), dim=-1)


class Overflow(nn.Module):
    """Activations past fp16's max (65504) in the middle; small again at the output.

    fc1 scales its input up ~1e5x, fc2 scales back down: plain ``.half()`` overflows to inf/NaN.
    """

    def __init__(self):
        super().__init__()
        self.fc0 = nn.Linear(16, 32)
        self.fc1 = nn.Linear(32, 32)
        self.fc2 = nn.Linear(32, 32)
        self.fc3 = nn.Linear(32, 8)
        with torch.no_grad():
            self.fc1.weight.mul_(3e5)
            self.fc2.weight.mul_(1e-5)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(torch.tanh(self.fc0(x)))))))


def run_pipeline(model, data, *, upto: str, **options) -> tuple[torch.fx.GraphModule, dict[str, PassResult]]:
    """Capture ``model`` and run the pipeline up to and including the pass named ``upto``; the graph module
    and each pass's result by pass name (its stats, and its rewrite rules' reasons for not firing)."""
    opts = Options.parse(
        dtype=options.pop("dtype", "float16"),
        keep_fp32=options.pop("keep_fp32", ()),
        dump_dir=None,
        device=None,
        debug=True,
    )
    samples = collect_samples(data)
    gm = capture(model, samples)
    passes = pipeline(opts, samples, torch.device("cpu"))
    names = [p.name() for p in passes]
    runs = PassManager(passes[: names.index(upto) + 1], debug=True).run(gm)
    return gm, {r.name: r.result for r in runs}


def stages(model, data, *, upto: str, **options):
    """Capture ``model`` and run the pipeline up to and including the pass named ``upto``."""
    return run_pipeline(model, data, upto=upto, **options)[0]


def ir_lines(gm) -> list[str]:
    """The graph as its dump prints it, less what the data decides: per node its statement and its type
    (planned dtype and shape), and ``# f32`` where the dump gives a reason for the dtype (fp32 math inside
    a kernel, a node kept high), without ranges, module paths or the reason's words. Export's bookkeeping
    without a value (``_guards_fn``) is left out. A before/expected test writes the graph it expects in
    these lines (as TVM's ToMixedPrecision tests write the expected Relay program)."""
    lines = []
    for row in format_graph(gm).splitlines():
        stmt, _, notes = row.partition("  : ")
        kind = notes.split("  ")[0]  # the type, first of the notes
        if not notes:  # return
            lines.append(stmt)
        elif kind != "-":
            note = re.search(r"# (b?f\d+): ", notes)
            lines.append(f"{stmt.rstrip()} : {kind}" + (f"  # {note.group(1)}" if note else ""))
    return lines


def why_not(result: PassResult, rule: str, *, besides: str) -> dict[str, int]:
    """How often each reason kept ``rule`` from firing in ``result``, less ``besides``: its first check's
    ("not a layer_norm"), which every other node it was tried on gives (so its count is the graph's size).
    A reason reworded, or ``besides`` reworded, changes the answer."""
    return {why: n for why, n in result.reasons.get(rule, {}).items() if why != besides}


def nodes_by_op(gm, op: str):
    from mpcompiler.ir import op_name

    return [n for n in gm.graph.nodes if n.op == "call_function" and op_name(n) == op]


def compile_tiny(**options):
    model = Tiny().eval()
    data = [torch.randn(8, 16) for _ in range(4)]
    return model, mpcompiler.compile(model, data, **options)


def run_handoff_snippet(md_path, namespace: dict) -> dict:
    """Run the Python snippet of an ONNX handoff file as a deployment team would paste it: in the
    artifact's folder, with ``namespace`` holding the arrays it reads; returns the namespace."""
    snippet = md_path.read_text().split("```python\n")[-1].split("```")[0]
    cwd = os.getcwd()
    try:
        os.chdir(md_path.parent)
        exec(snippet, namespace)
    finally:
        os.chdir(cwd)
    return namespace
