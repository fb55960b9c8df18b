"""The command line: compile writes what it says, report and inspect print the numbers those files hold.

One compile (with a tolerance, keep_fp32 and the ONNX export) is shared by the module's tests.
"""

import contextlib
import io
import json
import shutil
import subprocess
import sys

import onnx
import pytest
from onnx import TensorProto, helper

from mpcompiler.cli import main

MODEL, CALIB = "tests.cli_model:build", "tests.cli_model:samples"


@pytest.fixture(scope="module")
def compiled_dir(tmp_path_factory):
    """``mpcompiler compile`` of the MLP, fc2 kept fp32, with a tolerance; the out dir and what it printed."""
    out = tmp_path_factory.mktemp("cli") / "mlp"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # capsys is per test; this fixture is per module
        rc = main(["compile", MODEL, "--calib", CALIB, "--out", str(out), "--tolerance", "1e-3", "--keep-fp32", "fc2",
                   "--triton", "mlp"])  # fmt: skip
    assert rc == 0
    return out, printed.getvalue()


def test_compile_writes_report_dumps_code_and_onnx(compiled_dir):
    out, printed = compiled_dir
    for name in ("report.json", "graph_module.py", "model.onnx", "model.onnx.md", "model.onnx.json"):
        assert (out / name).is_file(), name
    assert (out / "dumps" / "00_capture.txt").is_file() and (out / "dumps" / "report.json").is_file()
    assert "def forward" in (out / "graph_module.py").read_text()
    # the Triton repository holds a copy of the same verified artifact, not a second export
    triton = out / "triton" / "mlp"
    assert (triton / "1" / "model.onnx").read_bytes() == (out / "model.onnx").read_bytes()
    assert 'name: "mlp"' in (triton / "config.pbtxt").read_text() and f"wrote {triton}/" in printed

    report = json.loads((out / "report.json").read_text())
    assert report["dtype"] == "float16" and report["calib_samples"] == 8  # 10 samples, 2 held out
    assert report["counts"] == {"float16": 2, "float32": 2} and report["casts"] == 2
    assert report["accuracy"]["met"] is True and report["accuracy"]["tolerance"] == 1e-3
    # 2 held out: the search judged plans on one, the report's error is the other's
    assert report["accuracy"]["max"] < 1e-3 and report["accuracy"]["samples"] == 1
    assert report["accuracy"]["searched"] == 1
    nodes = {n["name"]: n for n in report["nodes"]}
    assert nodes["linear"]["dtype"] == "float16" and nodes["linear_1"]["dtype"] == "float32"
    assert nodes["linear_1"]["reason"] == "keep_fp32 names 'fc2'"

    meta = {p.key: p.value for p in onnx.load(str(out / "model.onnx"), load_external_data=False).metadata_props}
    assert json.loads(meta["mpcompiler.ops_per_dtype"]) == report["counts"]
    assert f"compiling {MODEL} to float16 (tolerance 0.001)" in printed
    assert "ops per dtype: f16: 2, f32: 2" in printed
    assert f"wrote {out / 'model.onnx'} (verified with ONNX Runtime " in printed  # CPU or CUDA provider


def test_compile_a_causal_lm_for_generation(tmp_path, capsys):
    # --max-seq: the prompts calibrate whole sequences; model.onnx takes and returns the KV cache
    out = tmp_path / "llm"
    rc = main(["compile", "tests.cli_model:llama", "--calib", "tests.cli_model:prompts", "--out", str(out),
               "--max-seq", "32", "--max-batch", "2"])  # fmt: skip
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    accuracy = report["accuracy"]
    assert accuracy["perplexity"] == pytest.approx(accuracy["perplexity_fp32"], rel=5e-3)
    assert accuracy["greedy_agreement"] >= 0.9 and accuracy["max"] < 5e-3
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    assert "past_key_values.1.value" in [i.name for i in graph.input] and "present.0.key" in [
        o.name for o in graph.output
    ]
    assert sum(n.op_type == "GroupQueryAttention" for n in graph.node) == 2
    assert f"wrote {out / 'model.onnx'} (verified with ONNX Runtime " in capsys.readouterr().out


def test_report_prints_every_node_and_the_culprits(compiled_dir, capsys):
    out, _ = compiled_dir
    assert main(["report", str(out / "report.json"), "--top", "1"]) == 0
    text = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert "mpcompiler report: dtype float16, 8 calibration samples" in text
    table = [line.split() for line in text.splitlines() if line.startswith("%")]
    assert [row[0] for row in table[: len(report["nodes"])]] == [f"%{n['name']}" for n in report["nodes"]]
    assert ["%linear_1", "linear", "fc2", "float32", "keep_fp32", "keep_fp32", "names", "'fc2'"] in table
    assert ["%linear", "linear", "fc1", "float16", "op", "class", "compute-bound", "op", "(linear)"] in table

    # at 1e-3 the plan with every op low met the tolerance at once: nothing was ranked
    assert report["search"]["sensitivity_passes"] == 0 and "culprits: none ranked" in text


def test_report_prints_the_culprits_of_a_search_that_ranked(tmp_path, capsys):
    # every op low measures 2.3e-4 on the search's sample: at 2e-4 the search ranks the ops
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["compile", MODEL, "--calib", CALIB, "--out", str(tmp_path), "--tolerance", "2e-4"]) == 0
    assert main(["report", str(tmp_path / "report.json"), "--top", "1"]) == 0
    text = capsys.readouterr().out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["search"]["sensitivity_passes"] > 0 and report["search"]["kept_high"] > 0
    culprits = text.split("culprits (the 1 ops")[1].splitlines()[2:]
    assert len(culprits) == 1
    top = max((n for n in report["nodes"] if n["sensitivity"] is not None), key=lambda n: n["sensitivity"])
    name, _, _, dtype, sensitivity, _ = culprits[0].split()
    assert name == f"%{top['name']}" and dtype == top["dtype"]
    assert float(sensitivity) == pytest.approx(top["sensitivity"], rel=1e-2)


def test_report_without_a_tolerance_has_no_culprits(compiled_dir, tmp_path, capsys):
    report = json.loads((compiled_dir[0] / "report.json").read_text())
    report["search"] = None
    for node in report["nodes"]:
        node["sensitivity"] = node["local_error"] = None
    (tmp_path / "report.json").write_text(json.dumps(report))
    assert main(["report", str(tmp_path / "report.json")]) == 0
    assert "culprits: none measured (compile with --tolerance" in capsys.readouterr().out


def test_inspect_prints_the_precision_summary(compiled_dir, capsys):
    out, _ = compiled_dir
    assert main(["inspect", str(out / "model.onnx")]) == 0
    lines = [line.strip() for line in capsys.readouterr().out.splitlines()]
    for expected in (
        "low-precision dtype: float16",
        "ops per dtype: float16 2, float32 2",
        "compute-bound ops per dtype: float16 1, float32 1",
        "casts inserted: 2",
        "calibration samples: 8",
        "ONNX verification tolerance: 0.005 rel. L2 vs fp32 and FX module",
    ):
        assert expected in lines
    fx = next(line for line in lines if line.startswith("FX module's rel. L2 error vs fp32 on 1 held-out sample"))
    assert "apart from the 1 the tolerance search judged plans on" in fx
    assert "tolerance rel_l2 0.001: " in fx and fx.endswith(", met")
    assert lines[lines.index("inputs:") + 2].split() == ["x", "float32", "[x_dim0,", "16]"]
    assert lines[lines.index("outputs:") + 2].split() == ["output", "float32", "[x_dim0,", "4]"]


def test_inspect_says_when_mpcompiler_did_not_make_the_file(tmp_path, capsys):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["n", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["n", 3])],
    )
    onnx.save(helper.make_model(graph), tmp_path / "other.onnx")
    assert main(["inspect", str(tmp_path / "other.onnx")]) == 0
    text = capsys.readouterr().out
    assert "not made by mpcompiler" in text and "precision summary (" not in text
    assert ["x", "float16", "[n,", "3]"] in [line.split() for line in text.splitlines()]

    (tmp_path / "junk.onnx").write_bytes(b"\x00not a model")
    assert main(["inspect", str(tmp_path / "junk.onnx")]) == 2
    assert f"cannot read {tmp_path / 'junk.onnx'} as an ONNX model" in capsys.readouterr().err


@pytest.mark.parametrize(
    "spec,message",
    [
        ("tests.no_such_module:build", "cannot import module 'tests.no_such_module' of model factory"),
        ("tests.cli_model:nope", "module 'tests.cli_model' has no 'nope' (model factory 'tests.cli_model:nope')"),
        ("tests.cli_model", "model factory 'tests.cli_model' must be MODULE:NAME"),
        ("tests.cli_model:NOT_CALLABLE", "model factory 'tests.cli_model:NOT_CALLABLE' is a int, not a function"),
    ],
)
def test_a_factory_that_cannot_be_found_exits_2_naming_it(spec, message, tmp_path, capsys):
    assert main(["compile", spec, "--calib", CALIB, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mpcompiler: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()  # nothing written


def test_an_mpcompiler_error_exits_2_with_its_class_and_message(tmp_path, capsys):
    assert main(["compile", MODEL, "--calib", CALIB, "--out", str(tmp_path), "--device", "gpu0"]) == 2
    assert "mpcompiler: error: OptionError: device='gpu0' is not a torch device" in capsys.readouterr().err


def test_a_rerun_replaces_the_earlier_outputs_and_only_them(compiled_dir, tmp_path, capsys):
    out = tmp_path / "mlp"
    shutil.copytree(compiled_dir[0], out)
    (out / "notes.txt").write_text("the user's")
    (out / "dumps" / "precision.png").write_bytes(b"the plot of the tolerance search")  # also without matplotlib
    stale = [out / "dumps" / "precision.png", *(out / "dumps").glob("*_search_precision.txt")]
    assert len(stale) == 2  # the tolerance search's outputs; this run has none
    assert main(["compile", MODEL, "--calib", CALIB, "--out", str(out), "--no-onnx"]) == 0
    assert not (out / "model.onnx").exists() and not (out / "triton").exists() and not any(f.exists() for f in stale)
    assert (out / "notes.txt").read_text() == "the user's"
    report = json.loads((out / "report.json").read_text())
    assert report["search"] is None and report["counts"] == {"float16": 4}  # no keep_fp32 this time
    assert "wrote" in capsys.readouterr().out


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert all(command in text for command in ("compile", "report", "inspect"))
    with pytest.raises(SystemExit):
        main(["compile", "--help"])
    text = capsys.readouterr().out
    assert "MODULE:FACTORY" in text and "graph_module.py" in text and "--no-onnx" in text
    with pytest.raises(SystemExit) as exit_:
        main(["report", "r.json", "--top", "0"])
    assert exit_.value.code == 2 and "must be 1 or more" in capsys.readouterr().err


def test_python_dash_m_mpcompiler_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "mpcompiler", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("usage: mpcompiler")
    assert "inspect" in done.stdout


def test_help_and_the_package_import_load_neither_torch_nor_onnx():
    # the compiler's names load on first use: --help answers at once (it took ~9 s on this CPU)
    code = (
        "import sys, mpcompiler\n"
        "from mpcompiler.cli import main\n"
        "try:\n    main(['compile', '--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'onnx') if m in sys.modules))\n"
        "print(mpcompiler.compile.__module__, 'compile' in dir(mpcompiler))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-2:] == ["[]", "mpcompiler.api True"]


def test_triton_needs_the_onnx_artifact_and_a_folder_name(tmp_path, capsys):
    assert main(["compile", MODEL, "--calib", CALIB, "--out", str(tmp_path), "--no-onnx", "--triton", "m"]) == 2
    assert "--triton packages the ONNX artifact: drop --no-onnx" in capsys.readouterr().err
    assert main(["compile", MODEL, "--calib", CALIB, "--out", str(tmp_path), "--triton", "a/b"]) == 2
    assert "Triton model name 'a/b'" in capsys.readouterr().err and not any(tmp_path.iterdir())  # before compiling


def test_calibrate_a_share_then_compile_with_the_statistics(tmp_path, capsys):
    stats = tmp_path / "calib-0.pt"
    assert main(["calibrate", MODEL, "--calib", "tests.cli_model:first_samples", "--out", str(stats)]) == 0
    assert f"wrote {stats}: statistics of " in capsys.readouterr().out and stats.is_file()
    out = tmp_path / "mlp"
    args = ["compile", MODEL, "--calib", "tests.cli_model:rest_samples", "--out", str(out), "--no-onnx"]
    assert main([*args, "--calibration", str(stats)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["calib_samples"] == 4 + 5  # the file's four, and five of the six (one held out)
    import mpcompiler
    from tests.cli_model import build, samples

    whole = mpcompiler.compile(build(), samples()[:9], val_data=samples()[9:]).report  # the same nine at once
    assert {n["name"]: n["range"] for n in report["nodes"]} == {n.name: n.range for n in whole.nodes}

    (tmp_path / "bad.pt").write_text("not statistics")
    capsys.readouterr()
    assert main([*args, "--calibration", str(tmp_path / "bad.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mpcompiler: error: CalibrationError: ") and "bad.pt is not calibration statistics" in err
    with pytest.raises(SystemExit):
        main(["calibrate", MODEL, "--calib", "tests.cli_model:first_samples", "--out", str(stats), "--dynamic", "x"])
