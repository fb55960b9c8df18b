"""Per layer: cuDNN's fused conv + bias [+ residual] + ReLU against Inductor's conv + Triton epilogue.

    python benchmarks/conv_fusion.py      (needs a CUDA GPU)

ResNet-50's layer shapes in fp16, NHWC. Prints per shape the mean of 50 runs after 10
warm-ups (CUDA events) of torch.compile(relu(conv2d + bias + z)) and aten.cudnn_convolution_add_relu,
the same without the residual, and each one's relative L2 error against fp32.
"""

import torch

F = torch.nn.functional
CL = torch.channels_last
SHAPES = [  # (batch, in channels, size, out channels, kernel)
    (128, 64, 56, 256, 1), (128, 64, 56, 64, 3), (128, 256, 56, 64, 1), (128, 128, 28, 512, 1),
    (128, 512, 7, 2048, 1), (128, 256, 14, 256, 3), (1, 64, 56, 256, 1), (1, 256, 14, 256, 3),
]  # fmt: skip


def ms(fn, n=50) -> float:
    for _ in range(10):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    end.synchronize()
    return round(start.elapsed_time(end) / n, 4)


def compare(n: int, c: int, h: int, k: int, r: int) -> str:
    pad = r // 2
    x = torch.randn(n, c, h, h, device="cuda", dtype=torch.half).to(memory_format=CL)
    w = (torch.randn(k, c, r, r, device="cuda", dtype=torch.half) * 0.05).to(memory_format=CL)
    b = torch.randn(k, device="cuda", dtype=torch.half)
    z = torch.randn(n, k, h, h, device="cuda", dtype=torch.half).to(memory_format=CL)
    inductor_add = torch.compile(lambda: torch.relu(F.conv2d(x, w, b, padding=pad) + z))
    inductor = torch.compile(lambda: torch.relu(F.conv2d(x, w, b, padding=pad)))
    args = ([1, 1], [pad, pad], [1, 1], 1)
    fused_add = lambda: torch.ops.aten.cudnn_convolution_add_relu(x, w, z, 1.0, b, *args)  # noqa: E731
    fused = lambda: torch.ops.aten.cudnn_convolution_relu(x, w, b, *args)  # noqa: E731
    ref = torch.relu(F.conv2d(x.float(), w.float(), b.float(), padding=pad) + z.float())
    err = [float((y.float() - ref).norm() / ref.norm()) for y in (inductor_add(), fused_add())]
    return (
        f"{(n, c, h, k, r)} conv+bias+add+relu: inductor {ms(inductor_add)} ms, cudnn {ms(fused_add)} ms; "
        f"conv+bias+relu: inductor {ms(inductor)} ms, cudnn {ms(fused)} ms; "
        f"rel. error inductor {err[0]:.3g}, cudnn {err[1]:.3g}"
    )


def main():
    torch.backends.cudnn.benchmark = True
    for shape in SHAPES:
        print(compare(*shape), flush=True)


if __name__ == "__main__":
    main()
