"""Dumps: a numbered file per pass that changed the graph, and their text checked against golden files.

Regenerate the golden files with MPCOMPILER_UPDATE_GOLDEN=1 after a deliberate format change.
"""

import json
import os
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import mpcompiler

GOLDEN = Path(__file__).parent / "golden"


class Small(nn.Module):
    """Fixed weights, so the dump is the same on every machine."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.head = nn.Linear(3, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.arange(12.0).reshape(3, 4) / 10 - 0.5)
            self.fc.bias.fill_(0.25)
            self.head.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.5, -1.0]]))
            self.head.bias.zero_()

    def forward(self, x):
        return torch.log_softmax(self.head(torch.relu(self.fc(x))) * 100.0, dim=-1)


def _compile(tmp_path, debug):
    data = [torch.linspace(-2, 2, 8).reshape(2, 4), torch.linspace(-1, 3, 12).reshape(3, 4)]
    return mpcompiler.compile(Small().eval(), data, dump_dir=tmp_path, debug=debug)


def _stable(text: str) -> str:
    return re.sub(r"; [\d.]+ ms\)", "; <ms>)", text)


def assert_golden(dump_dir: Path, name: str, model: str) -> None:
    """The dump ``name`` in ``dump_dir``, its time made ``<ms>``, is ``golden/<model>_<name>`` to the byte
    (MPCOMPILER_UPDATE_GOLDEN=1 writes it there instead)."""
    got = _stable((dump_dir / name).read_text())
    golden = GOLDEN / f"{model}_{name}"
    if os.environ.get("MPCOMPILER_UPDATE_GOLDEN"):
        golden.write_text(got)
    assert got == golden.read_text(), f"{name} differs from {golden}"


def test_dump_files_and_golden_text(tmp_path):
    _compile(tmp_path, debug=False)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [
        "00_capture.txt",
        "04_calibrate_ranges.txt",
        "05_assign_precision.txt",
        "07_insert_casts.txt",
        "report.json",
    ]
    for name in ("05_assign_precision.txt", "07_insert_casts.txt"):
        assert_golden(tmp_path, name, "small")


def test_a_second_compile_into_a_dump_dir_leaves_no_dump_of_the_first(tmp_path):
    _compile(tmp_path, debug=True)  # a dump per pass
    (tmp_path / "notes.txt").write_text("the user's own file")
    _compile(tmp_path, debug=False)  # dumps only the passes that change the graph
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "08_eliminate_casts.txt" not in files and "06_place_casts.txt" not in files
    assert "04_calibrate_ranges.txt" in files and "notes.txt" in files


def test_debug_dumps_every_pass_and_report_json_names_every_decision(tmp_path):
    compiled = _compile(tmp_path, debug=True)
    assert sorted(p.name for p in tmp_path.glob("0*.txt"))[-1] == "08_eliminate_casts.txt"
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["dtype"] == "float16" and data["calib_samples"] == 2
    assert [p["name"] for p in data["passes"]] == [
        "clean_graph",
        "fold_batch_norm",
        "lower_fused",
        "calibrate_ranges",
        "assign_precision",
        "place_casts",
        "insert_casts",
        "eliminate_casts",
    ]
    by_name = {n["name"]: n for n in data["nodes"]}
    assert by_name["log_softmax"]["math_dtype"] == "float32" and by_name["linear"]["dtype"] == "float16"
    assert all(n["reason"] for n in data["nodes"])
    assert data["counts"] == compiled.report.counts()


def test_a_debug_dump_says_why_each_rewrite_rule_did_not_fire(tmp_path):
    # mpcompiler.rewrite: each rule's commonest reasons, under the IR of the pass that tried it
    _compile(tmp_path, debug=True)
    lowered = (tmp_path / "03_lower_fused.txt").read_text()
    assert "// gelu did not fire: not a gelu" in lowered or "// gelu did not fire: not tanh or erf" in lowered
    assert re.search(r"// skip_layer_norm did not fire: not a layer_norm \(x\d+\)", lowered)
    eliminated = (tmp_path / "08_eliminate_casts.txt").read_text()
    assert "// identity did not fire: changes dtype" in eliminated
    _compile(tmp_path, debug=False)  # a plain run's dumps keep the IR alone
    assert "did not fire" not in (tmp_path / "07_insert_casts.txt").read_text()


def test_report_json_loads_back(tmp_path):
    """Report.load reads what compile() saved: the same nodes, counts, accuracy and summary."""
    compiled = _compile(tmp_path, debug=False)
    loaded = mpcompiler.Report.load(tmp_path / "report.json")
    assert loaded.nodes == compiled.report.nodes and loaded.accuracy == compiled.report.accuracy
    assert loaded.counts() == compiled.report.counts() and str(loaded) == str(compiled.report)
    (tmp_path / "other.json").write_text('{"nodes": []}')
    with pytest.raises(ValueError, match="other.json is not an mpcompiler report.json"):
        mpcompiler.Report.load(tmp_path / "other.json")
