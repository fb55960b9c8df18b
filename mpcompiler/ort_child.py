"""Run an ONNX artifact in ONNX Runtime in a child process, so that ONNX Runtime's crashes stay there.

ONNX Runtime 1.30-1.32's CPU provider has been seen to kill the whole process (SIGSEGV) while
creating a session for a valid fp16 graph (docs/onnx.md). export_onnx verifies every artifact, so
it runs ONNX Runtime here, through :func:`run`: a crash, a hang or an error inside ONNX Runtime
becomes an :class:`~mpcompiler.errors.ExportError` naming what happened, and the caller's process
lives on. The child imports numpy and onnxruntime only (not torch, not mpcompiler): this file is
run as a script's source, from the folder the feeds are in.
"""

from __future__ import annotations

import ctypes
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

TIMEOUT_S = 600.0  # a session that runs this long on a few samples has hung


FORCED = "__forced_tokens__"  # a feed's tokens to decode a causal LM with (see run)
BF16 = "tensor(bfloat16)"  # numpy has none: bf16 tensors travel as their uint16 bits, both ways


def run(
    model: Path, feeds: list[dict[str, np.ndarray]], providers: list, *, timeout: float = TIMEOUT_S
) -> tuple[str, list[list[np.ndarray]]]:
    """Run ``model`` on each feed dict in a child process; returns the provider that ran it and the
    outputs per feed. Inputs and outputs travel as ``.npz`` files beside ``model``; a bf16 input is fed as
    its uint16 bits (``feed_array``), and a bf16 output comes back as float32 (exact).

    A feed with tokens under :data:`FORCED` ([batch, n]) is a causal LM's right-padded prompt
    (``past_key_values.*`` inputs, ``present.*`` outputs): after the prefill the child decodes those
    tokens one step at a time, feeding the presents back, and appends its own choice at each step, the
    argmax of the logits before each forced token ([batch, n]), to the feed's outputs. A near tie then
    costs one step, not the rest."""
    from mpcompiler.errors import ExportError  # here: the child runs this file without mpcompiler

    folder = model.parent
    np.savez(folder / "feeds.npz", **{f"{i}/{k}": v for i, feed in enumerate(feeds) for k, v in feed.items()})
    # the child runs in the model's folder: a relative path would be resolved twice
    args = [model.name, json.dumps(providers), str(len(feeds))]
    try:
        done = subprocess.run(
            [sys.executable, "-c", _script(), *args],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        raise ExportError(f"ONNX Runtime did not finish running {model.name} in {timeout:g} s: it hangs") from exc
    if done.returncode < 0:
        name = signal.Signals(-done.returncode).name
        raise ExportError(
            f"ONNX Runtime crashed ({name}) while loading or running {model.name} with {providers}, in a child "
            f"process (this process is unaffected); this is a bug in ONNX Runtime. Its last words: "
            f"{_tail(done.stderr)}"
        )
    if done.returncode != 0:
        raise ExportError(f"ONNX Runtime could not run {model.name} with {providers}: {_tail(done.stderr)}")
    with np.load(folder / "outputs.npz") as out:
        outputs = [[_float(out[f"{i}/{k}"], k in out[f"{i}/bf16"]) for k in range(int(out[f"{i}/count"]))]
                   for i in range(len(feeds))]  # fmt: skip
    return done.stdout.strip().splitlines()[-1], outputs


def feed_array(tensor) -> np.ndarray:
    """A torch tensor as ``run`` takes it: numpy, a bf16 one as its uint16 bits."""
    import torch  # here: the child runs this file without torch

    tensor = tensor.detach().cpu()
    return tensor.view(torch.int16).numpy().view(np.uint16) if tensor.dtype == torch.bfloat16 else tensor.numpy()


def _float(array: np.ndarray, bf16: bool) -> np.ndarray:
    """An output as numpy holds it: bf16 bits widened to the float32 of the same value."""
    return (array.astype(np.uint32) << 16).view(np.float32) if bf16 else array


def _ortvalue(ort, array: np.ndarray, onnx_type: str):
    """A feed as ONNX Runtime takes it: uint16 bits of a bf16 input as a bf16 tensor."""
    if onnx_type == BF16:
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(np.ascontiguousarray(array, np.uint16), 16)
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))


def _numpy(value) -> np.ndarray:
    """An output (on the CPU) as numpy: a bf16 one as its uint16 bits, copied from ONNX Runtime's buffer."""
    if value.data_type() != BF16:
        return np.asarray(value.numpy())
    shape = tuple(value.shape())
    if not np.prod(shape, dtype=int):
        return np.zeros(shape, np.uint16)
    bits = ctypes.cast(value.data_ptr(), ctypes.POINTER(ctypes.c_uint16))
    return np.ctypeslib.as_array(bits, shape=shape).copy()


def _script() -> str:
    return Path(__file__).read_text()


def _tail(text: str, lines: int = 1) -> str:
    kept = [line.strip() for line in text.strip().splitlines() if line.strip()][-lines:]
    return " | ".join(kept)[-1500:] or "(nothing on stderr)"


def _decode(ort, sess, mask: np.ndarray, outs: list, forced: np.ndarray) -> np.ndarray:
    """The argmax before each forced token, decoding them after a prefill of right-padded prompts (``mask``,
    its outputs ``outs``): each step feeds the token, the mask grown by one slot per row (each row's tokens
    packed at its front), the rows' next positions, and the presents back as the pasts (as ONNX Runtime
    gave them: a bf16 cache never leaves its OrtValues)."""
    names = [o.name for o in sess.get_outputs()]
    lengths = mask.sum(-1)
    logits = _logits(outs[0])[np.arange(len(lengths)), lengths - 1]  # each row's last prompt token
    chosen = []
    for step in range(forced.shape[1]):
        chosen.append(logits.argmax(-1)[:, None].astype(np.int64))
        pasts = {n.replace("present.", "past_key_values.", 1): o for n, o in zip(names[1:], outs[1:], strict=True)}
        width = mask.shape[1] + 1 + step
        feed = {
            "input_ids": forced[:, step : step + 1].astype(np.int64),
            "attention_mask": (np.arange(width) <= lengths[:, None]).astype(np.int64),
            "position_ids": lengths[:, None].astype(np.int64),
        }
        outs = sess.run_with_ort_values(None, {k: _ortvalue(ort, v, "") for k, v in feed.items()} | pasts)
        lengths, logits = lengths + 1, _logits(outs[0])[:, -1]
    return np.concatenate(chosen, 1)


def _logits(value) -> np.ndarray:
    return _float(_numpy(value), value.data_type() == BF16)


def _child(model: str, providers: str, count: str) -> None:
    import onnxruntime as ort

    sess = ort.InferenceSession(model, providers=json.loads(providers))
    types = {i.name: i.type for i in sess.get_inputs()}
    outputs = {}
    with np.load("feeds.npz") as feeds:
        for i in range(int(count)):
            feed = {k.split("/", 1)[1]: feeds[k] for k in feeds.files if k.split("/", 1)[0] == str(i)}
            forced = feed.pop(FORCED, None)
            missing = types.keys() - feed.keys()
            if missing:
                raise ValueError(f"the artifact's inputs {sorted(missing)} are not among the model's {sorted(feed)}")
            feed = {k: v for k, v in feed.items() if k in types}
            outs = sess.run_with_ort_values(None, {k: _ortvalue(ort, v, types[k]) for k, v in feed.items()})
            arrays = [_numpy(o) for o in outs]
            if forced is not None:
                arrays.append(_decode(ort, sess, feed["attention_mask"], outs, forced))
            bf16 = [k for k, o in enumerate(outs) if o.data_type() == BF16]
            outputs |= {f"{i}/{k}": a for k, a in enumerate(arrays)}
            outputs |= {f"{i}/count": np.array(len(arrays)), f"{i}/bf16": np.array(bf16, dtype=np.int64)}
    np.savez("outputs.npz", **outputs)
    print(sess.get_providers()[0])


if __name__ == "__main__":
    _child(*sys.argv[1:])
