"""fold_batch_norm: folds where exact, leaves alone where it must not, and keeps fp32 numbers."""

import torch
import torch.nn as nn

from mpcompiler.passes import FoldBatchNorm
from tests.helpers import nodes_by_op, rel_err, run_pipeline, stages, why_not


def _randomize(bn):
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    return bn


class ConvBN(nn.Module):
    def __init__(self, conv_bias):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=conv_bias)
        self.bn = _randomize(nn.BatchNorm2d(8))
        self.fc = nn.Linear(8, 4)
        self.bn1d = _randomize(nn.BatchNorm1d(4))

    def forward(self, x):
        return self.bn1d(self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3))))


def test_folds_conv_and_linear_with_and_without_bias():
    for conv_bias in (False, True):
        model = ConvBN(conv_bias).eval()
        gm = stages(model, [torch.randn(2, 3, 8, 8)], upto="clean_graph")
        x = torch.randn(4, 3, 8, 8)
        before = gm(x)
        result = FoldBatchNorm().run(gm)
        assert result.stats == {"folded": 2}
        assert not nodes_by_op(gm, "batch_norm")
        assert nodes_by_op(gm, "conv2d")[0].args[2] is not None  # a bias now
        assert rel_err(gm(x), before) < 1e-6
        assert model.conv.weight.dtype == torch.float32 and not hasattr(model, "conv_bias_folded")


class NotFoldable(nn.Module):
    """The conv's output is read twice, and a batch norm follows a relu: neither may fold."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = _randomize(nn.BatchNorm2d(8))
        self.bn2 = _randomize(nn.BatchNorm2d(8))

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y, self.bn2(torch.relu(y))


def test_leaves_batch_norm_whose_producer_is_shared_or_not_a_conv():
    gm = stages(NotFoldable().eval(), [torch.randn(2, 3, 8, 8)], upto="clean_graph")
    assert FoldBatchNorm().run(gm).stats == {"folded": 0}
    assert len(nodes_by_op(gm, "batch_norm")) == 2


class SharedWeight(NotFoldable):
    """NotFoldable's two, and a conv whose weight another call of it reads: folding would change that call."""

    def __init__(self):
        super().__init__()
        self.conv2 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn3 = _randomize(nn.BatchNorm2d(8))

    def forward(self, x):
        return *super().forward(x), self.bn3(self.conv2(x)) + self.conv2(x * 2)


def test_each_batch_norm_that_cannot_fold_says_why():
    model = SharedWeight().eval()
    gm, results = run_pipeline(model, [torch.randn(2, 3, 8, 8)], upto="fold_batch_norm")
    assert not results["fold_batch_norm"].modified and len(nodes_by_op(gm, "batch_norm")) == 3
    assert why_not(results["fold_batch_norm"], "folded", besides="not an inference batch norm") == {
        "its conv or linear has other readers": 1,  # bn(y) + y
        "not fed by a conv or linear": 1,  # bn2(relu(y))
        "weight or bias read elsewhere, or not constant": 1,  # conv2's weight, read by its second call
    }
    x = torch.randn(2, 3, 8, 8)
    for got, ref in zip(gm(x), model(x), strict=True):
        assert torch.equal(got, ref)


def test_user_model_weights_are_not_touched():
    model = ConvBN(conv_bias=False).eval()
    w = model.conv.weight.detach().clone()
    gm = stages(model, [torch.randn(2, 3, 8, 8)], upto="fold_batch_norm")
    assert torch.equal(model.conv.weight, w) and model.conv.bias is None
    assert not torch.equal(gm.conv.weight, w)
