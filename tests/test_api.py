"""The public API: options are validated, the compiled module behaves like the model."""

import pytest
import torch

import mpcompiler
from tests.helpers import Tiny, compile_tiny, rel_err


def _data():
    return [torch.randn(4, 16) for _ in range(2)]


@pytest.mark.parametrize(
    "options,match",
    [
        ({"dtype": "int8"}, "dtype='int8' is not supported"),
        ({"dtype": "auto"}, "dtype='auto' is not supported"),
        ({"keep_fp32": [3]}, "keep_fp32 must be a module path or op name"),
        ({"keep_fp32": [""]}, "keep_fp32 must be"),
        ({"device": "gpu0"}, "device='gpu0' is not a torch device"),
        ({"debug": "yes"}, "debug must be True or False"),
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


def test_dtype_spellings():
    assert (
        mpcompiler.Options.parse(dtype=torch.bfloat16, keep_fp32="fc1", dump_dir=None, device=None, debug=False).dtype
        == torch.bfloat16
    )
    assert mpcompiler.Options.parse(dtype="fp16", keep_fp32=(), dump_dir=None, device="cpu", debug=None).keep_fp32 == ()


def test_compiled_module_api(tmp_path):
    model, compiled = compile_tiny(dump_dir=tmp_path)
    assert isinstance(compiled, torch.nn.Module)
    assert isinstance(compiled.graph_module, torch.fx.GraphModule)
    x = torch.randn(6, 16)
    assert rel_err(compiled(x), model(x)) < 5e-3
    assert (tmp_path / "report.json").exists()
    assert "target float16" in str(compiled.report)
    with pytest.raises(mpcompiler.OptionError, match="compile again with dtype"):
        compiled.to(torch.float32)
    assert compiled.to("cpu") is compiled
