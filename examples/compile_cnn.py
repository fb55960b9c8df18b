"""Compile torchvision ResNet-50 (random init, ImageNet shapes) to fp16 and check it on held-out images.

The images are scikit-learn's handwritten digits, upscaled to 3x224x224 and normalized as for ImageNet:
real images, not noise, without a download.

    python -m examples.compile_cnn [--out-dir out/cnn] [--dtype float16] [--device cpu]
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from sklearn.datasets import load_digits

from examples.common import compile_timed, finish, parse_args

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def digit_images(n: int) -> torch.Tensor:
    """n digits as ImageNet-style inputs: 3x224x224, normalized."""
    digits = torch.tensor(load_digits().images[:n], dtype=torch.float32) / 16.0
    x = F.interpolate(digits[:, None], size=224, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    return (x - IMAGENET_MEAN) / IMAGENET_STD


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], "out/cnn")
    out_dir = Path(args.out_dir)
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval().to(args.device)
    images = digit_images(24).to(args.device)
    calib = [images[i : i + 4] for i in range(0, 16, 4)]  # 16 images to calibrate on
    held_out = images[16:24]  # 8 it never saw
    compiled, seconds = compile_timed(
        model,
        calib,
        val_data=[held_out],
        tolerance=args.tolerance,
        dtype=args.dtype,
        device=args.device,
        dump_dir=out_dir / "dumps",
    )
    with torch.no_grad():
        ref = model(held_out)
        out = compiled(held_out)
    metrics = {
        "held_out_images": len(held_out),
        "rel_l2_error_vs_fp32": float((out.double() - ref.double()).norm() / ref.double().norm()),
        "top1_agreement_vs_fp32": float((out.argmax(1) == ref.argmax(1)).float().mean()),
    }
    finish("resnet50", compiled, metrics, out.cpu(), out_dir, seconds, "resnet50.onnx")


if __name__ == "__main__":
    main()
