"""A model whose activations pass fp16's range mid-network: .half() breaks, mpcompiler does not."""

import torch

import mpcompiler
from tests.helpers import TOL, Overflow, rel_err


def test_overflowing_model_compiles_finite_and_names_what_it_kept_high():
    model = Overflow().eval()
    calib = [torch.randn(16, 16) for _ in range(8)]
    held_out = torch.randn(64, 16)
    with torch.no_grad():
        ref = model(held_out)
        mid = model.fc1(torch.tanh(model.fc0(held_out)))
    assert mid.abs().max() > torch.finfo(torch.float16).max  # the premise: past 65504 mid-network

    half = Overflow().eval()
    half.load_state_dict(model.state_dict())
    out_half = half.half()(held_out.half())
    assert not torch.isfinite(out_half).all()  # plain .half() gives inf/NaN

    compiled = mpcompiler.compile(model, calib)
    out = compiled(held_out)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL[torch.float16]

    kept = {n.module_path: n for n in compiled.report.kept_high() if n.op == "linear"}
    assert set(kept) == {"fc1", "fc2"}
    assert kept["fc1"].rule == kept["fc2"].rule == "range"
    assert "output reaches" in kept["fc1"].reason and "input %relu reaches" in kept["fc2"].reason
    assert "fc1" in str(compiled.report) and "past f16's max 65504" in str(compiled.report)
    low = compiled.report.counts("low")
    assert low == {"float16": 2, "float32": 2}  # fc0 and fc3 still run in fp16
