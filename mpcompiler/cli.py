"""The command line: ``mpcompiler compile``, ``report``, ``inspect`` and ``calibrate``.

    mpcompiler compile mymodels:build --calib mymodels:samples --out out/mlp --tolerance 1e-3
    mpcompiler report out/mlp/report.json
    mpcompiler inspect out/mlp/model.onnx
    mpcompiler calibrate mymodels:build --calib mymodels:my_share --out calib-0.pt   # then compile --calibration

Also ``python -m mpcompiler``. Every command is a thin layer over the Python API (``mpcompiler.compile``,
``CompiledModule.export_onnx``, ``Report.load``, ``mpcompiler.calibrate``); docs/cli.md describes them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import mpcompiler
from mpcompiler._version import __version__
from mpcompiler.files import clear_dumps, write_atomic

# torch, onnx and the compiler load inside the command that needs them: --help and a bad command line
# answer at once (importing them all took ~9 s on the CPU)

EXIT_ERROR = 2  # a bad command line, a MODULE:NAME that cannot be loaded, or an mpcompiler error
ONNX_NAME = "model.onnx"
# What `compile` writes under --out; a rerun removes these first, so no file from an earlier run
# (a pass dump the new run does not write, an ONNX file with --no-onnx) is taken for this run's.
OUTPUTS = ("report.json", "graph_module.py", ONNX_NAME, f"{ONNX_NAME}.md", f"{ONNX_NAME}.json", f"{ONNX_NAME}.data")


class CliError(Exception):
    """A problem with what the command line names (a module, a file): printed as one line, exit 2."""


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit status.

    0 on success; 2 for a bad command line, a ``MODULE:NAME`` that cannot be imported or found, a file
    that cannot be read, or an :class:`~mpcompiler.MpCompilerError` (one line on stderr, no traceback).
    An exception raised inside the user's own factory or calibration function keeps its traceback."""
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except (CliError, mpcompiler.MpCompilerError) as exc:
        kind = "" if isinstance(exc, CliError) else f"{type(exc).__name__}: "
        message = " ".join(line.strip() for line in str(exc).splitlines())  # one line, for logs and grep
        print(f"mpcompiler: error: {kind}{message}", file=sys.stderr)
        return EXIT_ERROR


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpcompiler",
        description="Compile a PyTorch model to mixed precision (fp16/bf16 where safe, fp32 where not), "
        "and read what the compiler decided.",
        epilog="Run 'mpcompiler COMMAND --help' for a command's options. Exit status: 0 on success, "
        "2 on an error (one line on stderr).",
    )
    parser.add_argument("--version", action="version", version=f"mpcompiler {__version__}")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    raw = argparse.RawDescriptionHelpFormatter

    compile_ = commands.add_parser(
        "compile",
        help="compile a model; write the report, the dumps and the ONNX artifact",
        formatter_class=raw,
        description="""\
Compile the model that MODULE:FACTORY builds, calibrated on the samples --calib returns.

MODULE is a Python module importable from the current folder (mymodels, pkg.models);
FACTORY a function in it that takes no arguments and returns the fp32 torch.nn.Module
(it is put in eval mode). --calib names a function that takes no arguments and returns
the calibration samples, as mpcompiler.compile() takes them: a list (or any iterable) of
samples, each a tensor, a tuple of positional arguments or a dict of keyword arguments.
The last fifth of the samples (at most 4; none of fewer than 5) is held back to measure
the error vs fp32 on.

Writes, under --out DIR (earlier outputs of this command there are replaced):
  DIR/report.json       every node's dtype and why, ranges, accuracy (mpcompiler report reads it)
  DIR/dumps/            the IR after each pass that changed it (docs/dumps.md)
  DIR/graph_module.py   the emitted FX module's code, to read; it is not a saved module:
                        mpcompiler has no save/load of a compiled module (to run it, compile
                        again in Python, or deploy model.onnx)
  DIR/model.onnx        the ONNX artifact, verified in ONNX Runtime, with its handoff notes
                        model.onnx.md and model.onnx.json (not with --no-onnx)
  DIR/triton/NAME/      with --triton NAME: a Triton model repository holding that artifact""",
        epilog="""\
example:
  # mymodels.py: def build(): return MyNet()
  #              def samples(): return [torch.randn(8, 16) for _ in range(10)]
  mpcompiler compile mymodels:build --calib mymodels:samples --out out/mynet --tolerance 1e-3""",
    )
    compile_.add_argument("model", metavar="MODULE:FACTORY", help="the function that returns the model")
    compile_.add_argument(
        "--calib",
        required=True,
        metavar="MODULE:FUNCTION",
        help="the function that returns the calibration samples (FUNCTION alone: one in the model's MODULE)",
    )
    compile_.add_argument("--out", required=True, type=Path, metavar="DIR", help="where the outputs go")
    compile_.add_argument(
        "--dtype",
        default="float16",
        choices=["float16", "bfloat16", "auto", "fp8"],
        help="the low-precision dtype ops may run in; auto: fp16 where safe, bf16 where fp16 would "
        "overflow or underflow; fp8: fp16, and e4m3 GEMMs for the linears where the plan and --tolerance "
        "allow (a GPU of compute capability 8.9+) (default: %(default)s)",
    )
    compile_.add_argument(
        "--tolerance",
        type=float,
        metavar="X",
        help="relative L2 error vs fp32 to meet on the held-out samples: the ops that cost the most "
        "accuracy stay fp32 until it is met, and the report ranks them (culprits). Default: none, "
        "the precision rules alone decide",
    )
    compile_.add_argument(
        "--keep-fp32",
        action="append",
        default=[],
        metavar="PATH_OR_OP",
        help="a module path (encoder.layer.3.attention: it and all inside it) or an op name (softmax) to keep "
        "in fp32; repeat for more",
    )
    compile_.add_argument(
        "--device",
        help="where calibration runs and the compiled module lives: cpu, cuda, cuda:1 (default: the model's device)",
    )
    compile_.add_argument(
        "--max-seq",
        type=_positive_int,
        metavar="N",
        help="compile a causal LM for generation with a static KV cache of N tokens (prompt plus new ones); "
        "--calib returns its prompts, and model.onnx takes and returns the cache (docs/llm.md)",
    )
    compile_.add_argument(
        "--max-batch",
        type=_positive_int,
        metavar="N",
        help="with --max-seq: the KV cache's rows, the largest batch generation takes (default: 1)",
    )
    compile_.add_argument(
        "--onnx",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="export DIR/model.onnx and verify it in ONNX Runtime (default: on)",
    )
    compile_.add_argument(
        "--verify",
        default="error",
        choices=["error", "warn", "off"],
        help="the ONNX artifact's check in ONNX Runtime on the held-out samples: error (fail past 5e-3 "
        "rel. L2 error vs fp32 or the FX module), warn, or off (no ONNX Runtime needed) (default: %(default)s)",
    )
    compile_.add_argument(
        "--padding",
        default="any",
        choices=["any", "right"],
        help="the ONNX artifact's attention mask contract: any (taken whole, exact for any padding) or right "
        "(each row's ones first, read as its length: ONNX Runtime's fused attention kernels; docs/onnx.md) "
        "(default: %(default)s)",
    )
    compile_.add_argument(
        "--triton",
        metavar="NAME",
        help="also write DIR/triton/NAME/ (config.pbtxt and 1/model.onnx), a Triton Inference Server model "
        "repository for its ONNX Runtime backend, from the verified artifact (docs/deploy.md)",
    )
    compile_.add_argument(
        "--calibration",
        nargs="+",
        type=Path,
        metavar="STATS",
        help="calibration statistics 'mpcompiler calibrate' wrote (other processes' samples): merged, and the "
        "samples of --calib added to them (docs/deploy.md)",
    )
    compile_.set_defaults(run=_compile)

    calibrate = commands.add_parser(
        "calibrate",
        help="calibrate on a share of the samples; write the statistics for compile --calibration",
        description="Calibrate the model MODULE:FACTORY builds on the samples --calib returns (all of them: "
        "none is held out) and write the statistics to --out, for 'mpcompiler compile --calibration' to "
        "merge with others: several processes, each with its share of the samples (docs/deploy.md).",
    )
    calibrate.add_argument("model", metavar="MODULE:FACTORY", help="the function that returns the model")
    calibrate.add_argument(
        "--calib", required=True, metavar="MODULE:FUNCTION", help="the function that returns this share's samples"
    )
    calibrate.add_argument("--out", required=True, type=Path, metavar="STATS", help="the statistics file to write")
    calibrate.add_argument("--device", help="where calibration runs (default: the model's device)")
    calibrate.add_argument(
        "--dynamic",
        action="append",
        default=[],
        type=_dims,
        metavar="INPUT:DIMS",
        help="dims of an input to capture dynamic whatever these samples (input_ids:1): give every process the "
        "same, where the samples' lengths vary in one process and not in another; repeat for more inputs",
    )
    calibrate.set_defaults(run=_calibrate)

    report = commands.add_parser(
        "report",
        help="print a report.json: per-node dtypes and reasons, and the culprits",
        description="Print the report 'mpcompiler compile' (or compile(dump_dir=...)) wrote: its summary, "
        "one line per node (op, module path, dtype, rule and reason), and, if it was compiled with a "
        "tolerance, the culprits: the ops that cost the most accuracy in low precision.",
    )
    report.add_argument("path", type=Path, metavar="REPORT_JSON", help="DIR/report.json or DIR/dumps/report.json")
    report.add_argument(
        "--top", type=_positive_int, default=10, metavar="N", help="how many culprits to list (default: %(default)s)"
    )
    report.set_defaults(run=_report)

    inspect = commands.add_parser(
        "inspect",
        help="print the precision summary an ONNX artifact carries",
        description="Print the precision summary mpcompiler stored in an ONNX file's metadata (dtype, ops "
        "per dtype, casts, errors, tolerance) and its inputs and outputs with dtypes and shapes. Weights "
        "in external data are not read.",
    )
    inspect.add_argument("path", type=Path, metavar="MODEL_ONNX", help="the .onnx file")
    inspect.set_defaults(run=_inspect)
    return parser


def _dims(text: str) -> tuple[str, list[int]]:
    name, sep, dims = text.rpartition(":")
    try:
        values = [int(d) for d in dims.split(",")]
    except ValueError:
        values = []
    if not sep or not name or not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be INPUT:DIMS, dims past the batch's: input_ids:1")
    return name, values


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more; got {value}")
    return value


# compile


def _load(spec: str, what: str, default_module: str | None = None) -> Callable:
    """The callable ``MODULE:NAME`` names, imported from the current folder as ``python -m`` would."""
    module_name, sep, name = spec.rpartition(":")
    if not sep and default_module is not None:
        module_name = default_module
    if not module_name or not name:
        raise CliError(f"{what} {spec!r} must be MODULE:NAME, e.g. mymodels:build")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:  # a console script's path lacks the cwd
        sys.path.insert(0, "")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(f"{exc.name}.")):  # it, or its package
            raise CliError(
                f"cannot import module {module_name!r} of {what} {spec!r}: {exc} (run from the folder it is "
                "in, or add that folder to PYTHONPATH)"
            ) from exc
        # the module is there, but something it imports is not
        raise CliError(
            f"importing module {module_name!r} of {what} {spec!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    if not hasattr(module, name):
        raise CliError(f"module {module_name!r} has no {name!r} ({what} {spec!r})")
    obj = getattr(module, name)
    if not callable(obj):
        raise CliError(f"{what} {spec!r} is a {type(obj).__name__}, not a function")
    return obj


def _clear_outputs(out: Path) -> None:
    """Remove what an earlier ``compile`` wrote under ``out``, and only that."""
    if not out.is_dir():
        return
    for name in OUTPUTS:
        (out / name).unlink(missing_ok=True)
    clear_dumps(out / "dumps")
    shutil.rmtree(out / "triton", ignore_errors=True)


def _model_and_samples(args: argparse.Namespace) -> tuple:
    """The model MODULE:FACTORY builds (in eval mode) and the samples --calib returns."""
    import torch

    factory = _load(args.model, "model factory")
    calib = _load(args.calib, "calibration function", default_module=args.model.rpartition(":")[0])
    model = factory()
    if not isinstance(model, torch.nn.Module):
        raise CliError(f"{args.model}() returned a {type(model).__name__}, not a torch.nn.Module")
    return model.eval(), calib()


def _compile(args: argparse.Namespace) -> int:
    if args.triton and not args.onnx:
        raise CliError("--triton packages the ONNX artifact: drop --no-onnx")
    if args.triton:
        from mpcompiler.triton_repo import check_name

        check_name(args.triton)  # before the compile, not after it
    model, samples = _model_and_samples(args)
    calibration = _statistics(args.calibration) if args.calibration else None
    out: Path = args.out
    _clear_outputs(out)
    print(f"compiling {args.model} to {args.dtype}" + (f" (tolerance {args.tolerance:g})" if args.tolerance else ""))
    compiled = mpcompiler.compile(
        model,
        samples,
        dtype=args.dtype,
        tolerance=args.tolerance,
        keep_fp32=args.keep_fp32,
        device=args.device,
        dump_dir=out / "dumps",
        calibration=calibration,
        max_seq=args.max_seq,
        max_batch=args.max_batch,
    )
    print(compiled.report)
    compiled.report.save(out / "report.json")
    write_atomic(out / "graph_module.py", compiled.graph_module.code)
    print(f"wrote {out / 'report.json'} (read it with: mpcompiler report {out / 'report.json'})")
    print(f"wrote {out / 'dumps'}/ (the IR after each pass) and {out / 'graph_module.py'} (the FX module's code)")
    if args.onnx:
        artifact = compiled.export_onnx(out / ONNX_NAME, verify=args.verify, padding=args.padding)
        if artifact.verified_with:
            errors = ", ".join(f"{k} {v:.2e}" for k, v in artifact.error_vs_fp32.items())
            checked = f"verified with ONNX Runtime {artifact.verified_with}: rel. L2 error vs fp32 {errors}"
        else:
            checked = "not verified in ONNX Runtime"
        print(f"wrote {artifact.path} ({checked}) and its handoff notes {artifact.handoff}")
        if args.triton:
            folder = compiled.export_triton(out / "triton", args.triton, artifact=artifact)
            print(f"wrote {folder}/ (a Triton model repository: tritonserver --model-repository={out / 'triton'})")
    return 0


def _statistics(paths: list[Path]):
    """The statistics files merged into one (a file that is not one is a CalibrationError naming it)."""
    parts = [mpcompiler.Calibration.load(path) for path in paths]
    return parts[0].merge(*parts[1:])


# calibrate


def _calibrate(args: argparse.Namespace) -> int:
    model, samples = _model_and_samples(args)
    statistics = mpcompiler.calibrate(model, samples, device=args.device, dynamic=dict(args.dynamic) or None)
    statistics.save(args.out)
    print(
        f"wrote {args.out}: statistics of {len(statistics.nodes)} values over {statistics.samples} samples "
        f"(merge them with: mpcompiler compile ... --calibration {args.out} ...)"
    )
    return 0


# report


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "-" if value in (None, "") else str(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Left-aligned columns; the last one (a reason) is not padded."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    return [
        "  ".join([*(c.ljust(w) for c, w in zip(r, widths, strict=False)), r[-1]]).rstrip() for r in [header, *rows]
    ]


def _report(args: argparse.Namespace) -> int:
    from mpcompiler.report import Report

    try:
        report = Report.load(args.path)
    except (OSError, ValueError, TypeError) as exc:  # JSONDecodeError is a ValueError
        raise CliError(f"cannot read {args.path} as an mpcompiler report: {exc}") from exc
    print("\n".join(report.summary()))
    print()
    rows = [
        [
            f"%{n.name}",
            n.op + (" (inserted)" if n.inserted_cast else ""),
            _cell(n.module_path),
            _cell(n.dtype),
            _cell(n.rule),
            _cell(n.reason + (f"; {n.fp8_reason}" if n.fp8_reason else "")),  # a linear's e4m3 level, or why not
        ]
        for n in report.nodes
    ]
    print("\n".join(_table(["node", "op", "module path", "dtype", "rule", "reason"], rows)))
    print()
    try:
        culprits = report.culprits(args.top)
    except ValueError:
        print("culprits: none measured (compile with --tolerance to rank the ops by sensitivity)")
        return 0
    if not culprits:
        print("culprits: none ranked (the tolerance search met the tolerance at its first evaluation, with "
              "every op it could keep high in low precision)")  # fmt: skip
        return 0
    print(f"culprits (the {len(culprits)} ops that cost the most accuracy in low precision, most first):")
    rows = [
        [f"%{d.name}", d.op, _cell(d.module_path), _cell(d.dtype), _cell(d.sensitivity), _cell(d.local_error)]
        for d in culprits
    ]
    print("\n".join(_table(["node", "op", "module path", "dtype", "sensitivity", "local error"], rows)))
    return 0


# inspect


def _onnx_type(value) -> tuple[str, str]:
    """(dtype, shape) of an ONNX graph input or output."""
    import onnx

    tensor = value.type.tensor_type
    name = onnx.TensorProto.DataType.Name(tensor.elem_type).lower()
    dtype = {"float": "float32", "double": "float64"}.get(name, name)
    if not tensor.HasField("shape"):
        return dtype, "?"
    dims = [d.dim_param or (str(d.dim_value) if d.HasField("dim_value") else "?") for d in tensor.shape.dim]
    return dtype, f"[{', '.join(dims)}]"


def _per_dtype(text: str) -> str:
    counts = json.loads(text)
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"


def _inspect(args: argparse.Namespace) -> int:
    import onnx

    try:
        model = onnx.load(str(args.path), load_external_data=False)  # the summary needs no weights
    except Exception as exc:  # protobuf's DecodeError and OSError: the file is not a readable ONNX model
        raise CliError(f"cannot read {args.path} as an ONNX model: {type(exc).__name__}: {exc}") from exc
    meta = {p.key: p.value for p in model.metadata_props}
    ours = {k: v for k, v in meta.items() if k.startswith("mpcompiler.")}
    opsets = ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in model.opset_import)
    producer = f"{model.producer_name} {model.producer_version}".strip() or "unknown"
    print(f"{args.path}: ONNX IR version {model.ir_version}, opset {opsets}; producer {producer}")
    if not ours:
        print(f"not made by mpcompiler: {args.path} has no mpcompiler.* metadata_props to summarize")
    else:
        print(_summary(ours, model))
    for title, values in (("inputs", model.graph.input), ("outputs", model.graph.output)):
        print(f"{title}:")
        rows = [[v.name, *_onnx_type(v)] for v in values]
        print("\n".join("  " + line for line in _table(["name", "dtype", "shape"], rows)))
    return 0


def _summary(meta: dict[str, str], model) -> str:
    """The precision summary from the model's ``mpcompiler.*`` metadata_props (docs/onnx.md)."""
    from mpcompiler.accuracy import Accuracy

    meta = dict(meta)
    lines = [f"precision summary (mpcompiler {meta.pop('mpcompiler.version', '?')}):"]
    labels = {
        "mpcompiler.dtype": ("low-precision dtype", str),
        "mpcompiler.io_dtype": ("inputs and outputs", str),
        "mpcompiler.padding": ("attention mask padding", str),
        "mpcompiler.ops_per_dtype": ("ops per dtype", _per_dtype),
        "mpcompiler.compute_ops_per_dtype": ("compute-bound ops per dtype", _per_dtype),
        "mpcompiler.casts": ("casts inserted", str),
        "mpcompiler.calibration_samples": ("calibration samples", str),
    }
    for key, (label, show) in labels.items():
        if key in meta:
            lines.append(f"  {label}: {show(meta.pop(key))}")
    if "mpcompiler.fx_error_vs_fp32" in meta:
        accuracy = json.loads(meta.pop("mpcompiler.fx_error_vs_fp32"))
        if accuracy:
            lines.append(f"  FX module's {Accuracy.from_dict(accuracy)}")
    if "mpcompiler.tolerance" in meta:  # export_onnx's, not compile()'s
        lines.append(f"  ONNX verification tolerance: {meta.pop('mpcompiler.tolerance')} rel. L2 vs fp32 and FX module")
    # what the ONNX nodes themselves carry (provenance), beside the FX-level counts above
    node_dtypes = Counter(p.value for n in model.graph.node for p in n.metadata_props if p.key == "mpcompiler.dtype")
    if node_dtypes:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(node_dtypes.items()))
        lines.append(f"  ONNX nodes per dtype (of {len(model.graph.node)} nodes, by provenance): {counts}")
    lines += [f"  {k}: {v}" for k, v in sorted(meta.items())]  # keys a newer mpcompiler adds
    return "\n".join(lines)
