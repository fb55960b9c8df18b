"""A model and its calibration samples for tests/test_cli.py, named on the command line as
``tests.cli_model:build`` and ``tests.cli_model:samples``."""

import torch
import torch.nn as nn


class MLP(nn.Module):
    """Two linears and a softmax: small enough to compile and export in seconds."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x):
        return torch.softmax(self.fc2(torch.relu(self.fc1(x))), dim=-1)


def build() -> MLP:
    """The model factory: the same weights on every call."""
    torch.manual_seed(0)
    return MLP()


def samples() -> list[torch.Tensor]:
    """Ten batches: eight calibrate, the last two are held back to measure the error on."""
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 16, generator=g) for _ in range(10)]


NOT_CALLABLE = 3


def first_samples() -> list[torch.Tensor]:
    """The first four of ``samples()``: one process's share, for ``mpcompiler calibrate``."""
    return samples()[:4]


def rest_samples() -> list[torch.Tensor]:
    """The other six: the compiling process's share (it holds back the last one to measure the error on)."""
    return samples()[4:]


def llama():
    """tests/test_llm.py's two-layer Llama (grouped-query attention, random weights), for ``compile --max-seq``."""
    from tests.test_llm import _llama

    return _llama()


def prompts() -> list[dict]:
    """Five prompts of token ids, some rows left-padded: four calibrate, the last is held out."""
    from tests.test_llm import _prompt

    torch.manual_seed(2)
    return [
        _prompt(batch, length, pad) for batch, length, pad in ((2, 6, 2), (2, 9, 0), (1, 7, 0), (2, 5, 1), (2, 8, 3))
    ]
