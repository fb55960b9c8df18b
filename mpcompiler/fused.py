"""Fused ops, defined once: a torch.library custom op each (CPU and CUDA, composed of ATen ops), its
ONNX translation (an ONNX Runtime contrib op), and the table of targets that have a kernel for it.

``lower_fused`` consults :data:`KERNELS` so that nothing is emitted that the target cannot run fused:

- ``attention``: ATen's scaled_dot_product_attention. FX on CUDA and CPU runs it fused; torch.onnx
  writes it as ONNX ``Attention`` from opset 23, which ONNX Runtime's CUDA provider runs fused
  (measured: docs/perf.md). Eager attention (matmul, scale, mask, softmax, matmul) is rewritten to it.
- ``gelu``: a GELU written out as a formula (GPT-2's tanh form, the erf form) -> one ``aten.gelu``.
- ``skip_layer_norm``: residual add + layer_norm -> ``com.microsoft.SkipLayerNormalization``
  (fp32 statistics inside, fp16 I/O). For FX it would be two kernels either way: not emitted.
- ``bias_gelu``: linear's bias + GELU -> ``com.microsoft.BiasGelu`` (erf) / ``FastGelu`` (tanh).
  ONNX Runtime's CPU provider has them in fp32 only: not emitted for an fp16 CPU artifact.
- ``conv_bias_relu``: relu(conv2d + bias [+ residual]) -> one cuDNN convolution with the bias,
  the residual add and the ReLU in its epilogue (``aten.cudnn_convolution_relu``/``_add_relu``), for
  ``compiled.cuda_graph()``: one kernel instead of the convolution and an elementwise pass over its
  output (1.4-2.5x faster on ResNet-50's layers, H100, docs/perf.md), and the sum rounded once.
  Conv + BatchNorm is folded at compile time (``fold_batch_norm``). ONNX Runtime's ``FusedConv``
  (conv + bias + activation) has no fp16 CUDA kernel, so the ONNX artifact leaves convs to ORT.
"""

from __future__ import annotations

import onnx
import onnxscript
import torch
import torch.nn.functional as F
from onnx.defs import OpSchema

H, B, S = torch.float16, torch.bfloat16, torch.float32
ALL = frozenset({H, B, S})
TARGETS = ("fx-cuda", "fx-cpu", "ort-cuda", "ort-cpu")

# fused op -> target -> dtypes with a fused kernel there
KERNELS: dict[str, dict[str, frozenset[torch.dtype]]] = {
    "attention": dict.fromkeys(TARGETS, ALL),
    "gelu": dict.fromkeys(TARGETS, ALL),
    "skip_layer_norm": {"ort-cuda": ALL, "ort-cpu": frozenset({H, S})},
    "bias_gelu": {"ort-cuda": ALL, "ort-cpu": frozenset({S})},
    "conv_bias_relu": {"fx-cuda": frozenset({H, B})},  # lowered on the planned graph by cuda_graph()
}


def has_kernel(op: str, target: str, dtype: torch.dtype | None) -> bool:
    """Whether ``target`` runs fused op ``op`` in ``dtype`` (None: a graph of several dtypes)."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; targets are {TARGETS}")
    dtypes = KERNELS[op].get(target, frozenset())
    return dtype in dtypes if dtype is not None else dtypes == ALL


@torch.library.custom_op("mpcompiler::skip_layer_norm", mutates_args=())
def skip_layer_norm(
    x: torch.Tensor, skip: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """layer_norm(x + skip) over the last dim."""
    return F.layer_norm(x + skip, (x.shape[-1],), weight, bias, eps)


@skip_layer_norm.register_fake
def _(x, skip, weight, bias, eps):
    return torch.empty_like(x)


@torch.library.custom_op("mpcompiler::bias_gelu", mutates_args=())
def bias_gelu(x: torch.Tensor, bias: torch.Tensor, approximate: str) -> torch.Tensor:
    """gelu(x + bias), erf (``"none"``) or tanh form."""
    return F.gelu(x + bias, approximate=approximate)


@bias_gelu.register_fake
def _(x, bias, approximate):
    return torch.empty_like(x)


@torch.library.custom_op("mpcompiler::conv_bias_relu", mutates_args=())
def conv_bias_relu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> torch.Tensor:
    """relu(conv2d(x, weight, bias) + residual), the residual optional."""
    y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    return F.relu(y if residual is None else y + residual)


@conv_bias_relu.register_kernel("cuda")
def _(x, weight, bias, residual, stride, padding, dilation, groups):
    if residual is None:
        return torch.ops.aten.cudnn_convolution_relu(x, weight, bias, stride, padding, dilation, groups)
    return torch.ops.aten.cudnn_convolution_add_relu(x, weight, residual, 1.0, bias, stride, padding, dilation, groups)


@conv_bias_relu.register_fake
def _(x, weight, bias, residual, stride, padding, dilation, groups):
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


# ONNX Runtime's contrib schemas (github.com/microsoft/onnxruntime, docs/ContribOperators.md), which
# onnxscript needs to build the nodes and onnx.checker to check them.
_T = ("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "")


def _param(name: str, optional: bool = False) -> OpSchema.FormalParameter:
    option = OpSchema.FormalParameterOption.Optional if optional else OpSchema.FormalParameterOption.Single
    return OpSchema.FormalParameter(name, "T", "", param_option=option)


_SCHEMAS = [
    OpSchema(
        "SkipLayerNormalization",
        "com.microsoft",
        1,
        inputs=[_param("input"), _param("skip"), _param("gamma"), _param("beta", True), _param("bias", True)],
        outputs=[_param("output")],
        type_constraints=[_T],
        attributes=[OpSchema.Attribute("epsilon", OpSchema.AttrType.FLOAT, "", required=False)],
    ),
    OpSchema(
        "BiasGelu", "com.microsoft", 1, inputs=[_param("A"), _param("B")], outputs=[_param("C")], type_constraints=[_T]
    ),
    OpSchema(
        "FastGelu",
        "com.microsoft",
        1,
        inputs=[_param("X"), _param("bias", True)],
        outputs=[_param("Y")],
        type_constraints=[_T],
    ),
]
for _schema in _SCHEMAS:
    if not onnx.defs.has(_schema.name, _schema.domain):
        onnx.defs.register_schema(_schema)

_MSFT = onnxscript.values.Opset("com.microsoft", 1)


def _skip_layer_norm_onnx(x, skip, weight, bias, eps: float):
    return _MSFT.SkipLayerNormalization(x, skip, weight, bias, epsilon=eps)


def _bias_gelu_onnx(x, bias, approximate: str):
    if approximate == "tanh":
        return _MSFT.FastGelu(x, bias)
    return _MSFT.BiasGelu(x, bias)


ONNX_TRANSLATIONS = {
    torch.ops.mpcompiler.skip_layer_norm.default: _skip_layer_norm_onnx,
    torch.ops.mpcompiler.bias_gelu.default: _bias_gelu_onnx,
}
