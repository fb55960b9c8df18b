"""mpcompiler as a torch.compile backend: mixed precision for a model inside a larger program.

    backend = mpcompiler.backend(calib_data, tolerance=1e-3)   # calibration data given once
    fast = torch.compile(model, backend=backend, dynamic=False)
    fast(x)                                                    # the first call compiles
    backend.compiled[-1].report                                # what mpcompiler decided, node by node

    torch.compile(model, backend="mpcompiler", options={"calib_data": calib_data, "tolerance": 1e-3})

(the name is registered through the ``torch_dynamo_backends`` entry point). ``calib_data`` holds samples
of the compiled function's arguments, as :func:`mpcompiler.compile` takes them; the other options are
compile()'s.

Dynamo hands the backend each graph it captures, with the module's parameters and buffers as graph
inputs. The backend makes them the graph's own weights again (so the plan converts them once), reads
each calibration sample's values for the graph's other inputs off the function's arguments, through
the source dynamo records for each input (``L['x']``, ``L['batch']['input_ids']``), and compiles the
graph with :func:`mpcompiler.compile`. A graph of other code than the function torch.compile was
applied to (after a graph break) reads intermediate values that no sample gives: it runs as dynamo
captured it, in fp32, and a warning names it (``fullgraph=True`` turns a break into an error instead).
Each recompilation (a new shape, by dynamo's rules; ``dynamic=False`` keeps them to one per shape)
calibrates and compiles again, or runs as captured (a warning says so) where the samples cannot be
captured in its shapes. Module paths are
the model's (``encoder.layer.0.attention``), in the report and for ``keep_fp32``.
"""

from __future__ import annotations

import builtins
import inspect
import re
import warnings

import torch
import torch.fx

from mpcompiler.errors import OptionError

RESUMED = "torch_dynamo_resume_in_"  # dynamo's name for the code after a graph break


class Backend:
    """A torch.compile backend that compiles each captured graph with :func:`mpcompiler.compile`."""

    def __init__(self, calib_data, **options):
        self.samples = list(calib_data)  # read once: every graph and recompilation calibrates on them
        self.options = options
        self.compiled = []  # one CompiledModule per graph compiled, in order
        self.entry = None  # the code torch.compile was applied to: the first graph's

    def __call__(self, gm: torch.fx.GraphModule, example_inputs, options=None, **_):
        from torch._dynamo.symbolic_convert import InstructionTranslator

        import mpcompiler

        if options:
            raise OptionError(f"give compile()'s options to mpcompiler.backend(calib_data, ...), not options={options}")
        tx = InstructionTranslator.current_tx()
        code = tx.f_code
        self.entry = self.entry or code
        if code is not self.entry:  # after a graph break: a resumed function, or a callee compiled alone
            return _as_captured(gm, f"reads values from inside {self.entry.co_name} (after a graph break in "
                                    f"{code.co_name.removeprefix(RESUMED)})")  # fmt: skip
        root, inputs = _with_weights(gm, example_inputs, tx.f_locals)
        samples = [_graph_inputs(sample, i, code, tx.f_locals, inputs) for i, sample in enumerate(self.samples)]
        try:
            with torch._guards.tracing(None):  # outside dynamo's fake tensors: compile() runs the real model
                compiled = mpcompiler.compile(root, samples, **self.options)
        except mpcompiler.CaptureError as exc:  # seen: a recompilation for a shape the samples do not have
            return _as_captured(gm, f"cannot be captured on the calibration samples ({exc})")
        self.compiled.append(compiled)
        positions = [position for position, _ in inputs]

        def run(*args):
            return compiled(*(args[i] for i in positions))

        return run


def _as_captured(gm: torch.fx.GraphModule, why: str):
    warnings.warn(
        f"mpcompiler backend: a graph {why}; it runs as captured, in fp32 (torch.compile(..., fullgraph=True) "
        "makes a graph break an error)",
        stacklevel=3,
    )
    return gm.forward


def backend(calib_data, *misused, **options) -> Backend:
    """A torch.compile backend for ``torch.compile(model, backend=...)``: each graph torch.compile
    captures is compiled by :func:`mpcompiler.compile` with ``calib_data`` (samples of the compiled
    function's arguments) and ``options`` (compile()'s); see :mod:`mpcompiler.dynamo_backend`."""
    if misused or isinstance(calib_data, torch.fx.GraphModule):  # backend=mpcompiler.backend: dynamo calls it
        raise OptionError(
            "mpcompiler.backend makes a backend from calibration data: torch.compile(model, "
            "backend=mpcompiler.backend(samples, ...)), or backend='mpcompiler' with options={'calib_data': samples}"
        )
    return Backend(calib_data, **options)


_BY_OPTIONS: dict[int, tuple[dict, Backend]] = {}  # torch passes one options dict per torch.compile call


def entry_point(gm: torch.fx.GraphModule, example_inputs, options: dict | None = None, **_):
    """``torch.compile(model, backend="mpcompiler", options={"calib_data": ..., ...})``: one Backend per
    torch.compile call (its options dict), so that calib_data is read once for all its graphs."""
    if not options or "calib_data" not in options:
        raise OptionError(
            "backend='mpcompiler' needs calibration data: torch.compile(model, backend='mpcompiler', "
            "options={'calib_data': samples, ...}), or backend=mpcompiler.backend(samples, ...)"
        )
    if id(options) not in _BY_OPTIONS:
        rest = {k: v for k, v in options.items() if k != "calib_data"}
        _BY_OPTIONS[id(options)] = (options, Backend(options["calib_data"], **rest))  # options kept: id stays
    return _BY_OPTIONS[id(options)][1](gm, example_inputs)


def _source_name(node: torch.fx.Node) -> str:
    name = node.meta["grapharg"].source.name
    return name() if callable(name) else name  # a method in older torch, a property in 2.14


def _with_weights(gm, example_inputs, frame: dict) -> tuple[torch.fx.GraphModule, list]:
    """A copy of ``gm`` whose inputs read from the call's arguments stay inputs, and whose others (the
    modules' parameters and buffers, globals) are its weights; and the inputs kept, as (position among
    gm's inputs, source name). ``frame``: the traced call's arguments."""
    graph = torch.fx.Graph()
    env, inputs = {}, []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for position, (node, value) in enumerate(zip(placeholders, example_inputs, strict=True)):
        source = _source_name(node)
        state = "._parameters[" in source or "._buffers[" in source or isinstance(value, torch.nn.Parameter)
        arguments = [n for n in re.findall(r"L\['(\w+)'\]", source) if not isinstance(frame.get(n), torch.nn.Module)]
        if arguments and not state:
            if not isinstance(value, torch.Tensor):
                raise OptionError(
                    f"mpcompiler backend: graph input {source} is a {type(value).__name__}, not a tensor "
                    "(a dynamic size): compile with torch.compile(..., dynamic=False)"
                )
            env[node] = graph.placeholder(node.name)
            inputs.append((position, source))
        else:
            attr = f"w{position}_" + re.sub(r"\W+", "_", source).strip("_")[:80]
            if isinstance(value, torch.nn.Parameter):
                gm.register_parameter(attr, value)
            else:
                gm.register_buffer(attr, value)
            env[node] = graph.get_attr(attr)
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            env[node] = copy = graph.node_copy(node, lambda n: env[n])
            stack = copy.meta.get("nn_module_stack")
            if stack:  # the model's own module paths in the report and for keep_fp32: fc1, not L['self'].fc1
                copy.meta["nn_module_stack"] = {k: (_module_path(path), t) for k, (path, t) in stack.items()}
    graph.lint()
    # gm as the root: the new graph's attributes (the weights, gm's own constants and submodules) come along
    return torch.fx.GraphModule(gm, graph, class_name="MpDynamoGraph"), inputs


def _module_path(path: str) -> str:
    """A module's path as the model names it, from dynamo's source form (``L['self'].layers[0].fc``,
    ``L['fn'].2`` inside nn.Sequential, ``G['model'].fc`` for a global model)."""
    path = re.sub(r"\._modules\['([^']+)'\]", r".\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return re.sub(r"^[LG]\['\w+'\]\.?", "", path)  # the root: self, a wrapper's fn, a global model


def _parameters(code) -> tuple[tuple[str, ...], str | None, str | None]:
    """A code object's named arguments, and the names of its ``*args`` and ``**kwargs`` (or None)."""
    names = code.co_varnames
    named = names[: code.co_argcount + code.co_kwonlyargcount]
    varargs = names[len(named)] if code.co_flags & inspect.CO_VARARGS else None
    varkw = names[len(named) + (varargs is not None)] if code.co_flags & inspect.CO_VARKEYWORDS else None
    return named, varargs, varkw


def _frame(sample, code, template: dict) -> dict:
    """The compiled function's arguments for a calibration sample (a tensor, a tuple of positional
    arguments or a dict of keyword arguments), bound as Python would; ``template`` (the call dynamo
    traced) gives only the modules (``self``), which take no sample's value. A decorator's
    ``wrapper(*args, **kwargs)`` (transformers' forwards) keeps its module as the first positional one."""
    if hasattr(sample, "keys"):  # a dict, a tokenizer's BatchEncoding
        args, kwargs = (), dict(sample)
    else:
        args, kwargs = (tuple(sample) if isinstance(sample, (tuple, list)) else (sample,)), {}
    named, varargs, varkw = _parameters(code)
    frame = {k: v for k, v in template.items() if isinstance(v, torch.nn.Module)}  # self; the rest: the sample's
    positional = [n for n in named[: code.co_argcount] if not isinstance(template.get(n), torch.nn.Module)]
    frame.update(zip(positional, args, strict=False))
    if varargs is not None:
        lead = [a for a in template.get(varargs, ()) if isinstance(a, torch.nn.Module)]
        frame[varargs] = (*lead, *args[len(positional) :])
    elif len(args) > len(positional):
        raise OptionError(f"a calibration sample has {len(args)} positional arguments; the function takes {positional}")
    for key, value in kwargs.items():
        if key in named:
            frame[key] = value
        elif varkw is not None:
            frame[varkw] = {**frame.get(varkw, {}), key: value}
        else:
            raise OptionError(f"a calibration sample has keyword {key!r}; the function takes {', '.join(named)}")
    return frame


def _graph_inputs(sample, index: int, code, template: dict, inputs) -> tuple:
    """The graph's inputs for calibration sample ``index``, read off its arguments by their sources."""
    frame = _frame(sample, code, template)
    values = []
    for _, source in inputs:
        try:
            value = eval(source, {"__builtins__": builtins}, {"L": frame})  # a source: L['kwargs']['input_ids']
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            value, why = None, f"{type(exc).__name__}: {exc}"
        else:
            why = f"a {type(value).__name__}"
        if not isinstance(value, torch.Tensor):
            takes = [n for n in _parameters(code)[0] if not isinstance(template.get(n), torch.nn.Module)]
            raise OptionError(
                f"calibration sample {index} gives no tensor for the graph's input {source} ({why}); the "
                f"compiled function takes {', '.join(takes)}"
            )
        values.append(value)
    return tuple(values)
