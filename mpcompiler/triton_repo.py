"""A Triton Inference Server model repository for the ONNX artifact: ``compiled.export_triton(repo, name)``.

Writes, for Triton's ONNX Runtime backend::

    repo/name/config.pbtxt          the model configuration (text protobuf, Triton's ModelConfig)
    repo/name/1/model.onnx          the verified ONNX artifact (export_onnx), its handoff notes beside it
                                    (or a copy of an artifact exported before, under its own file name)

The configuration comes from the artifact's handoff JSON: each input and output with its Triton dtype
and dims (a dynamic dim is -1). When every input and output has the same dynamic first dim (the batch),
``max_batch_size`` is set, that dim leaves ``dims`` (Triton adds it) and the dynamic batcher is on;
otherwise ``max_batch_size`` is 0 and the dims are whole. A GPU instance group runs ONNX Runtime's CUDA
provider with the provider options the handoff measured fastest (``prefer_nhwc`` for CNNs), except
``enable_cuda_graph``: ONNX Runtime replays a CUDA graph on the buffers it captured, and Triton's backend
binds each request's own (and its dynamic batcher changes the shapes).
docs/deploy.md covers serving and scale-out.

The model's folder is built beside the repository's others and moved into place at the end: a failed
export leaves an earlier version of the model as it was.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import tempfile
from pathlib import Path

from mpcompiler.errors import OptionError

# handoff dtype names (ONNX's, lower case) -> Triton's DataType
TRITON_TYPES = {
    "float": "TYPE_FP32",
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "bfloat16": "TYPE_BF16",
    "double": "TYPE_FP64",
    "float64": "TYPE_FP64",
    "int64": "TYPE_INT64",
    "int32": "TYPE_INT32",
    "int16": "TYPE_INT16",
    "int8": "TYPE_INT8",
    "uint8": "TYPE_UINT8",
    "bool": "TYPE_BOOL",
}
# ONNX Runtime's CUDA graph replays the buffers it captured; Triton's backend binds each request's own
NOT_UNDER_TRITON = {"enable_cuda_graph"}


def export_triton(
    compiled,
    repo,
    name: str,
    *,
    max_batch_size: int | None = None,
    instances: int = 1,
    kind: str = "gpu",
    artifact=None,
    **onnx_options,
) -> Path:
    """Write ``repo/name/config.pbtxt`` and ``repo/name/1/model.onnx`` for Triton's ONNX Runtime backend.

    Called as ``compiled.export_triton(repo, name, ...)``.

    Args:
        repo: the model repository (created if missing); other models in it are left alone.
        name: the model's name in Triton (its folder): letters, digits, ``_``, ``-`` and ``.``.
        max_batch_size: the largest batch the dynamic batcher forms. Default: ``max_batch`` of a model
            compiled for generation, else 8. Ignored (0) where the artifact has no batch dim.
        instances: model instances per device (``instance_group``'s count).
        kind: ``"gpu"`` (ONNX Runtime's CUDA provider) or ``"cpu"``.
        artifact: an :class:`~mpcompiler.OnnxArtifact` this module's ``export_onnx`` wrote: copied into
            the repository with its handoff and weights files, under their names (the config then
            names the model file), instead of exporting again.
        onnx_options: passed to :meth:`export_onnx` (``io_dtype``, ``verify``, ``tolerance``, ...).

    Returns the model's folder. Raises :class:`~mpcompiler.OptionError` for a bad name or option, and
    what export_onnx raises (the repository then holds what it held before).
    """
    check_name(name)
    if kind not in ("gpu", "cpu"):
        raise OptionError(f"kind={kind!r}: 'gpu' or 'cpu'")
    for option, value in (("instances", instances), ("max_batch_size", max_batch_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise OptionError(f"{option} must be a positive int; got {value!r}")
    if artifact is not None and onnx_options:
        raise OptionError(f"artifact= is exported already: {', '.join(onnx_options)} would not apply to it")
    if max_batch_size is None:
        max_batch_size = compiled.lm.max_batch if compiled.lm is not None else 8
    repo = Path(repo)
    repo.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=repo))
    staging.chmod(0o755)  # mkdtemp's 0700 would keep a server running as another user out
    try:
        if artifact is None:
            artifact = compiled.export_onnx(staging / "1" / "model.onnx", **onnx_options)
        else:
            artifact = _copied(artifact, staging / "1")
        info = json.loads(artifact.handoff.with_suffix(".json").read_text())
        (staging / "config.pbtxt").write_text(model_config(info, name, max_batch_size, instances, kind))
        target = repo / name
        if target.exists():  # swap: the old folder is removed only once the new one is in place
            old = Path(tempfile.mkdtemp(prefix=f".{name}.old.", dir=repo))
            target.rename(old / name)
            try:
                staging.rename(target)
            except BaseException:
                (old / name).rename(target)  # the earlier model back where it was
                old.rmdir()
                raise
            shutil.rmtree(old)
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def check_name(name) -> None:
    """A Triton model name names a folder: letters, digits, ``_``, ``-`` and ``.``."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
        raise OptionError(f"Triton model name {name!r}: use letters, digits, '_', '-' and '.' (it names a folder)")


def _copied(artifact, folder: Path):
    """``artifact``'s files (the model, its handoff notes, its external weights) copied into ``folder``
    under their names: the model refers to its weights file by name, the handoff to the model's."""
    folder.mkdir(parents=True)
    files = [artifact.path, artifact.handoff, artifact.handoff.with_suffix(".json"), artifact.external_data]
    for source in (f for f in files if f is not None):
        shutil.copy2(source, folder / source.name)
    return dataclasses.replace(artifact, path=folder / artifact.path.name, handoff=folder / artifact.handoff.name)


def model_config(info: dict, name: str, max_batch_size: int, instances: int, kind: str) -> str:
    """Triton's ModelConfig for the artifact described by its handoff JSON ``info``, as text protobuf."""
    tensors = info["inputs"] + info["outputs"]
    first = {str(t["shape"][0]) if t["shape"] and isinstance(t["shape"][0], str) else None for t in tensors}
    batched = len(first) == 1 and None not in first
    lines = [f'name: "{name}"', 'backend: "onnxruntime"', f"max_batch_size: {max_batch_size if batched else 0}"]
    if info.get("model_file", "model.onnx") != "model.onnx":
        lines.append(f'default_model_filename: "{info["model_file"]}"')
    for field, values in (("input", info["inputs"]), ("output", info["outputs"])):
        entries = []
        for t in values:
            if t["dtype"] not in TRITON_TYPES:
                raise OptionError(f"ONNX {field} {t['name']!r} is {t['dtype']}, a type Triton's config has no name for")
            dims = [-1 if isinstance(d, str) else int(d) for d in t["shape"][1 if batched else 0 :]]
            shape = f"dims: {dims}" if dims else "dims: [1] reshape: { shape: [] }"  # Triton wants a dim
            entries.append(f'  {{ name: "{t["name"]}" data_type: {TRITON_TYPES[t["dtype"]]} {shape} }}')
        lines += [f"{field} [", ",\n".join(entries), "]"]
    if batched:
        lines.append("dynamic_batching { }")
    lines.append(f"instance_group [ {{ count: {instances} kind: KIND_{kind.upper()} }} ]")
    options = {k: v for k, v in info.get("cuda_provider_options", {}).items() if k not in NOT_UNDER_TRITON}
    if kind == "gpu" and options:
        parameters = " ".join(f'parameters {{ key: "{k}" value: "{v}" }}' for k, v in sorted(options.items()))
        cuda = f'{{ name: "cuda" {parameters} }}'
        lines.append(f"optimization {{ execution_accelerators {{ gpu_execution_accelerator: [ {cuda} ] }} }}")
    return "\n".join(lines) + "\n"
