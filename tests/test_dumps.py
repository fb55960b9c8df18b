"""Dumps: a numbered file per pass that changed the graph, and their text checked against golden files.

Regenerate the golden files with MPCOMPILER_UPDATE_GOLDEN=1 after a deliberate format change.
"""

import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import mpcompiler
from tests.helpers import TOL, rel_err

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


def _formula(shape, seed: int) -> torch.Tensor:
    """Values in [-0.2, 0.2] from integer arithmetic: the same on every machine and torch version (19 is a
    prime past every multiplier, 3 .. 17: no tensor is constant)."""
    n = math.prod(shape)
    return (((torch.arange(n) * (2 * seed + 3) + seed) % 19 - 9) / 45).reshape(shape)


class SelfAttention(nn.Module):
    """Eager attention as BERT writes it: q, k, v heads, scores scaled, the additive mask added, softmax."""

    def __init__(self, hidden=8, heads=2):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value, self.output = (nn.Linear(hidden, hidden) for _ in range(4))

    def forward(self, x, additive_mask):
        b, s, h = x.shape
        split = lambda t: t.view(b, s, self.heads, h // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(h // self.heads) + additive_mask
        context = torch.matmul(torch.softmax(scores, dim=-1), v).transpose(1, 2).reshape(b, s, h)
        return self.output(context)


class MaskedEncoder(nn.Module):
    """A BERT-like attention block: the padding mask made additive as Hugging Face encoders make it (0 at a
    token, fp32's min at padding: past fp16's range), then attention, the residual and a layer norm."""

    def __init__(self):
        super().__init__()
        self.attention = SelfAttention()
        self.norm = nn.LayerNorm(8)
        with torch.no_grad():
            for i, linear in enumerate(m for m in self.modules() if isinstance(m, nn.Linear)):
                linear.weight.copy_(_formula(linear.weight.shape, i))
                linear.bias.copy_(_formula(linear.bias.shape, i + 4) / 2)

    def forward(self, x, attention_mask):
        additive = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        return self.norm(x + self.attention(x, additive))


def _masked_sample(*lengths: int, seq: int = 6):
    """Hidden states from integer arithmetic, and a padding mask: row i has lengths[i] tokens, then padding.
    One sequence length: the batch is the graph's one dynamic dim (fewer symbols: a debug compile re-types
    the graph after each pass)."""
    n = len(lengths) * seq * 8
    x = (((torch.arange(n) * 7) % 19 - 9) / 9).reshape(len(lengths), seq, 8)
    return x, (torch.arange(seq) < torch.tensor(lengths)[:, None]).long()


def test_masked_attention_golden_dumps_show_the_mask_clamped_before_its_cast(tmp_path):
    # 03: eager attention -> SDPA, the mask its attn_mask; 05: SDPA f16, the mask's arithmetic f32; 06: the
    # mask's range (fp32's min) named as what keeps it f32; 07: the mask clamped to f16's range, then cast
    model = MaskedEncoder().eval()
    compiled = mpcompiler.compile(model, [_masked_sample(6, 4), _masked_sample(3, 6, 5)], dump_dir=tmp_path, debug=True)
    for name in ("03_lower_fused.txt", "05_assign_precision.txt", "06_place_casts.txt", "07_insert_casts.txt"):
        assert_golden(tmp_path, name, "masked")
    # what the goldens protect, said apart from them (a regenerated golden must still show it)
    lines = (tmp_path / "07_insert_casts.txt").read_text().splitlines()
    clamp = next(i for i, line in enumerate(lines) if " = clamp(" in line)
    assert lines[clamp].startswith("%clamp_default = clamp(%mul, -65504, 65504) ")
    assert lines[clamp + 1].startswith("%mul_f16 = cast(%clamp_default) {to=f16} ")
    assert any(re.match(r"%scaled_dot_product_attention\w* = scaled_dot_product_attention\(.*, %mul_f16\)", line)
               for line in lines)  # fmt: skip
    (node,) = [n for n in compiled.report.nodes if n.op == "clamp"]
    assert node.rule == "clamp" and node.inserted and not node.inserted_cast
    # a row with every key masked stays finite, and the block is fp32's within TOL
    x, mask = _masked_sample(5, 0, 2)
    with torch.no_grad():
        got, ref = compiled(x, mask), model(x, mask)
    assert torch.isfinite(got).all() and rel_err(got, ref) < TOL[torch.float16]


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
