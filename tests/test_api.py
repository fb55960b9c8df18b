"""The public API: options are validated, the compiled module behaves like the model."""

import re

import pytest
import torch

import mpcompiler
from tests.helpers import TOL, Tiny, compile_tiny, rel_err


def _data():
    return [torch.randn(4, 16) for _ in range(2)]


@pytest.mark.parametrize(
    "options,match",
    [
        ({"dtype": "int8"}, "dtype='int8' is not supported"),
        ({"dtype": "float8"}, "dtype='float8' is not supported; use 'float16', 'bfloat16', 'auto' or 'fp8'"),
        ({"keep_fp32": [3]}, "keep_fp32 must be a module path or op name"),
        ({"keep_fp32": [""]}, "keep_fp32 must be"),
        ({"device": "gpu0"}, "device='gpu0' is not a torch device"),
        ({"debug": "yes"}, "debug must be True or False"),
        ({"dump_dir": 3}, "dump_dir must be a path; got 3"),
    ],
)
def test_bad_option_values_are_errors(options, match):
    with pytest.raises(mpcompiler.OptionError, match=match):
        mpcompiler.compile(Tiny(), _data(), **options)


def test_unknown_option_is_an_error():
    with pytest.raises(TypeError, match="unexpected keyword argument 'tolerence'"):
        mpcompiler.compile(Tiny(), _data(), tolerence=1e-3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_a_gpu_is_an_error():
    with pytest.raises(mpcompiler.OptionError, match="torch.cuda.is_available\\(\\) is False"):
        mpcompiler.compile(Tiny(), _data(), device="cuda")


def test_unwritable_dump_dir_is_an_option_error_before_any_work(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for dump_dir in (blocker, blocker / "dumps"):  # as root, a path under a file is what cannot be written
        message = rf"dump_dir='{re.escape(str(dump_dir))}' .*: {re.escape(str(blocker))} is a file, not a directory"
        with pytest.raises(mpcompiler.OptionError, match=message):
            mpcompiler.Options.parse(dtype="float16", keep_fp32=(), dump_dir=dump_dir, device=None, debug=False)
    with pytest.raises(mpcompiler.OptionError, match="dump_dir"):
        mpcompiler.compile(Tiny(), _data(), dump_dir=blocker / "dumps")
    fresh = tmp_path / "new" / "dumps"
    assert mpcompiler.Options.parse(dtype="float16", keep_fp32=(), dump_dir=fresh, device=None, debug=False).dump_dir
    assert fresh.is_dir() and not list(fresh.iterdir())  # created, and the write check left nothing behind


@pytest.mark.parametrize(
    "spelling,dtype",
    [("float16", torch.float16), ("fp16", torch.float16), ("half", torch.float16), (torch.float16, torch.float16),
     ("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16), (torch.bfloat16, torch.bfloat16)],
)  # fmt: skip
def test_dtype_spellings(spelling, dtype):
    options = mpcompiler.Options.parse(dtype=spelling, keep_fp32="fc1", dump_dir=None, device=None, debug=False)
    assert options.dtype == dtype and options.fallback is None and options.keep_fp32 == ("fc1",)
    assert not options.fp8


@pytest.mark.parametrize("spelling", ["fp8", "e4m3", "float8_e4m3fn", torch.float8_e4m3fn])
def test_fp8_spellings_plan_fp16_with_e4m3_gemms(spelling):
    options = mpcompiler.Options.parse(dtype=spelling, keep_fp32=(), dump_dir=None, device=None, debug=False)
    assert options.fp8 and options.dtype == torch.float16 and options.fallback is None


@pytest.mark.parametrize("spelling", ["float32", torch.float32, "f16", "float8", torch.float8_e5m2, ["float16"]])
def test_a_dtype_that_is_not_low_is_refused(spelling):
    with pytest.raises(mpcompiler.OptionError, match="dtype=.* is not supported"):
        mpcompiler.Options.parse(dtype=spelling, keep_fp32=(), dump_dir=None, device=None, debug=False)


def test_compiled_module_api(tmp_path):
    model, compiled = compile_tiny(dump_dir=tmp_path)
    assert isinstance(compiled, torch.nn.Module)
    assert isinstance(compiled.graph_module, torch.fx.GraphModule)
    x = torch.randn(6, 16)
    assert rel_err(compiled(x), model(x)) < TOL[torch.float16]
    assert (tmp_path / "report.json").exists()
    assert "dtype float16" in str(compiled.report)
    with pytest.raises(mpcompiler.OptionError, match="compile again with dtype"):
        compiled.to(torch.float32)
    assert compiled.to("cpu") is compiled


def test_input_the_module_was_not_compiled_for_is_an_input_error_naming_it():
    model, compiled = compile_tiny()  # samples of shape (8, 16): dim 0 dynamic, dim 1 static
    for x, message in [
        (torch.randn(8, 17), r"input x has size 17 in dim 1, expected 16 \(static: it did not vary across"),
        (torch.randn(8, 4, 16), r"input x has 3 dims \(8, 4, 16\), expected 2; .* takes x as \(\*, 16\) torch.float32"),
        (torch.randn(16), r"input x has 1 dim \(16,\), expected 2"),
        (torch.ones(8, 16, dtype=torch.long), r"input x is torch.int64, expected a floating-point dtype"),
    ]:
        with pytest.raises(mpcompiler.InputError, match=message):
            compiled(x)
    with pytest.raises(ValueError, match="input x"):  # an InputError is a ValueError too
        compiled(x=torch.randn(2, 17))
    for x in (torch.randn(3, 16), torch.randn(3, 16, dtype=torch.float64)):  # the dynamic dim; a dtype the graph casts
        assert rel_err(compiled(x), model(x.float())) < TOL[torch.float16]


def test_held_out_samples_measure_the_error_and_are_not_calibrated_on():
    model = Tiny().eval()
    data = [torch.randn(4, 16) for _ in range(9)] + [torch.randn(4, 16) * 50]  # the last one is far wider
    compiled = mpcompiler.compile(model, data)
    acc = compiled.report.accuracy
    assert acc.held_out and acc.samples == 2 and compiled.report.calib_samples == 8
    assert acc.rows == 8 and "on 2 held-out samples (8 rows):" in str(acc)  # a sample is a batch of 4
    assert list(acc.per_output) == ["output"] and 0 < acc.max < TOL[torch.float16]
    with torch.no_grad():
        direct = rel_err(
            torch.cat([compiled(s[0][0]) for s in compiled.val_samples]), torch.cat([model(d) for d in data[8:]])
        )
    assert acc.max == pytest.approx(direct, rel=1e-6)
    fc1 = next(n for n in compiled.report.nodes if n.op == "linear")
    assert fc1.range["samples"] == 8  # calibration never saw the held-out samples


def test_val_data_and_too_few_samples():
    model = Tiny().eval()
    compiled = mpcompiler.compile(model, [torch.randn(4, 16)] * 3, val_data=[torch.randn(2, 16)])
    assert compiled.report.accuracy.held_out and compiled.report.calib_samples == 3
    assert "on 1 held-out sample (2 rows):" in str(compiled.report.accuracy)
    few = mpcompiler.compile(model, [torch.randn(4, 16)] * 2)
    assert not few.report.accuracy.held_out and few.report.accuracy.samples == 2
    assert "none held out" in str(few.report)
    with pytest.raises(mpcompiler.CaptureError, match="validation sample 0 is a str"):
        mpcompiler.compile(model, [torch.randn(4, 16)], val_data=["x"])


def test_held_out_holds_back_that_many_samples():
    compiled = mpcompiler.compile(Tiny(), [torch.randn(3, 16) for _ in range(6)], held_out=2)
    assert compiled.report.accuracy.samples == 2 and compiled.report.accuracy.held_out
    assert compiled.report.calib_samples == 4


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"held_out": 6}, "held_out must count calib_data's samples, 0 to 5; got 6"),
        ({"held_out": True}, "held_out must count"),
        ({"held_out": 1, "val_data": [torch.randn(3, 16)]}, "give val_data or held_out, not both"),
    ],
)
def test_bad_held_out(kwargs, message):
    with pytest.raises(mpcompiler.OptionError, match=message):
        mpcompiler.compile(Tiny(), [torch.randn(3, 16) for _ in range(6)], **kwargs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_model_cast_whole_to_low_precision_is_an_error_naming_model_float(dtype):
    # its "fp32" reference would be itself (error 0) and its ranges measured in the low dtype (overflow as inf);
    # a model with fp16 parts of its own is planned (tests/test_eliminate_casts.py)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).to(dtype)
    model.register_buffer("table", torch.ones(4))  # an fp32 buffer, as Hugging Face's rotary inv_freq stays
    with pytest.raises(mpcompiler.OptionError, match=r"weights are all .*: .* pass model.float\(\)"):
        mpcompiler.compile(model, [torch.randn(4, 16, dtype=dtype) for _ in range(3)])
