"""Samples and devices: what a model is run on, and where.

A sample is ``(args, kwargs)``, read from what a user passes (a tensor, a tuple/list of positional
arguments, a dict of keyword arguments); the helpers move samples and models between devices and run a
model the way every fp32 reference here is computed (eval mode, no TF32).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable

import torch
import torch.utils._pytree as pytree

from mpcompiler.errors import CaptureError

Sample = tuple[tuple, dict]  # (positional args, keyword args)


def as_sample(sample, index: int, what: str = "calibration") -> Sample:
    """A calibration sample as (args, kwargs): a tensor, a tuple/list of args, or a dict of kwargs."""
    if isinstance(sample, torch.Tensor):
        return (sample,), {}
    if isinstance(sample, (tuple, list)):
        return tuple(sample), {}
    if isinstance(sample, dict) or hasattr(sample, "keys"):  # dict, or a tokenizer's BatchEncoding
        return (), dict(sample)
    text = "; text goes through its tokenizer first: tokenizer(text, return_tensors='pt')" * isinstance(sample, str)
    raise CaptureError(
        f"{what} sample {index} is a {type(sample).__name__}; a sample must be a tensor, "
        f"a tuple/list of positional arguments, or a dict of keyword arguments{text}"
    )


def collect_samples(data: Iterable, what: str = "calibration") -> list[Sample]:
    """Read ``data`` once (it may be a generator) into a list of (args, kwargs) samples."""
    name = "calib_data" if what == "calibration" else "val_data"
    if isinstance(data, (torch.Tensor, dict)):
        raise CaptureError(
            f"{name} must be an iterable of samples (a list, a DataLoader, a generator); "
            f"got a single {type(data).__name__}: wrap it in a list"
        )
    try:
        samples = [as_sample(s, i, what) for i, s in enumerate(data)]
    except TypeError as exc:
        if "not iterable" in str(exc):
            raise CaptureError(f"{name} must be iterable; got {type(data).__name__}") from exc
        raise
    if not samples:
        raise CaptureError(f"{name} is empty: give at least one sample")
    return samples


def to_device(sample: Sample, device: torch.device) -> Sample:
    return pytree.tree_map_only(torch.Tensor, lambda t: t.to(device), sample)


@contextlib.contextmanager
def on_device(model: torch.nn.Module, device: torch.device):
    """The model on ``device`` (capture and calibration run where the compiled module will), back
    on its own device afterwards. Its parameters keep their identity; only their storage moves."""
    home = model_device(model)
    if normalize_device(home) == normalize_device(device):
        yield model
        return
    model.to(device)
    try:
        yield model
    finally:
        model.to(home)


@contextlib.contextmanager
def strict_fp32():
    """fp32 math that is fp32: no TF32 in CUDA matmuls and convolutions (cuDNN allows it by default)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """The model in eval mode (an inference compiler captures eval-mode dropout and batch norm),
    back in its own mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def model_device(model: torch.nn.Module) -> torch.device:
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


def normalize_device(device: torch.device) -> torch.device:
    """``cuda`` -> ``cuda:0`` (the current device), so that equal devices compare equal."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device
