"""Atomic file writes (an artifact is either whole or absent, never half-written), and the dump folder's
own files."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    if path.is_dir():  # else the rename's error names the temporary file
        raise IsADirectoryError(errno.EISDIR, "a folder: give the path of the file to write in it", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep the artifact from the people it is for
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# export_onnx's dumps (its lowering's passes), in onnx/: removed by the next export too (its pass list varies)
ONNX_DUMPS = "onnx/[0-9][0-9]_*.txt"
# What compile() writes in a dump folder (one dump per pass; the smaller pipelines' in subfolders: search/,
# generation/, generation/decode<rows>/, cuda_graph/, onnx/): removed before a compile writes there, so no dump
# of an earlier run is read as this run's.
DUMP_PATTERNS = ("**/[0-9][0-9]_*.txt", "report.json", "precision.png")


def clear_dumps(folder: Path, patterns: tuple[str, ...] = DUMP_PATTERNS) -> None:
    """Remove the files an earlier run dumped in ``folder`` (those ``patterns`` match), and only those."""
    for pattern in patterns:
        for f in Path(folder).glob(pattern):
            f.unlink()
