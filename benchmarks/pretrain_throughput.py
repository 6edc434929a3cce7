"""Throughput of the pretraining train steps: MAE, SimCLR and a plain supervised step on the same encoder.

Runs each step on random data (no dataset needed), after warm-up, and prints images/s and step time side by
side, with MAE's speed relative to the supervised step of the same ViT. With `--mfu` (CUDA), it also reports
model FLOPs utilisation of the MAE step, counting 3 x the forward FLOPs of the encoder on the visible tokens
plus the decoder on all tokens (measured with torch's FlopCounterMode on one forward).

Examples:
    python benchmarks/pretrain_throughput.py                       # project default: tiny ViT, 8x8x1, CPU
    python benchmarks/pretrain_throughput.py --model vit_base_patch16_224 --img-size 224 --patch-size 16 \
        --channels 3 --batch 256 --precision bf16 --mfu              # MAE ViT-B/16 on a GPU
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from pipeline_lib.core import dist
from pipeline_lib.vision.config import ModelParams, PretrainParams
from pipeline_lib.vision.data.augment import AugmentConfig, BatchAugment
from pipeline_lib.vision.losses import nt_xent
from pipeline_lib.vision.pretrain import build_pretrain_model

# Dense bf16 peak of the accelerators we quote MFU for (TFLOP/s).
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


def timed(step: Callable[[], None], *, warmup: int, steps: int, device: torch.device) -> float:
    """Median-free simple timing: seconds per step over `steps` after `warmup` steps."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def make_step(model: nn.Module, loss_fn: Callable[[], Tensor], precision: str, device: torch.device) -> Callable:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit", help="'vit' (custom, see --embed-dim ...) or a timm ViT name")
    parser.add_argument("--img-size", type=int, default=8)
    parser.add_argument("--patch-size", type=int, default=2)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--embed-dim", type=int, default=64)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--compile", action="store_true", help="torch.compile each model (CUDA)")
    parser.add_argument("--mfu", action="store_true", help="report MAE model FLOPs utilisation (CUDA)")
    args = parser.parse_args()

    device = dist.resolve_device(args.device)
    model_cfg = ModelParams(name=args.model, img_size=args.img_size, patch_size=args.patch_size,
                            embed_dim=args.embed_dim, depth=args.depth, num_heads=args.num_heads)
    shape = dict(in_chans=args.channels, img_size=args.img_size)
    images = torch.rand(args.batch, args.channels, args.img_size, args.img_size, device=device)
    labels = torch.randint(0, 10, (args.batch,), device=device)
    mae = build_pretrain_model(PretrainParams(method="mae"), model_cfg, **shape).to(device)
    simclr = build_pretrain_model(PretrainParams(method="simclr"), model_cfg, **shape).to(device)
    supervised_encoder = build_pretrain_model(PretrainParams(method="mae"), model_cfg, **shape).encoder
    supervised = nn.Sequential(supervised_encoder, nn.Linear(supervised_encoder.num_features, 10)).to(device)
    augment = BatchAugment(AugmentConfig(), args.img_size)
    generator = torch.Generator().manual_seed(0)

    def compiled(module: nn.Module) -> nn.Module:
        return torch.compile(module) if args.compile and device.type == "cuda" else module

    mae_run, simclr_run, supervised_run = compiled(mae), compiled(simclr), compiled(supervised)

    def simclr_loss() -> Tensor:
        return nt_xent(*simclr_run(augment(images, generator), augment(images, generator)), temperature=0.2)

    losses = {
        "supervised": (supervised, lambda: F.cross_entropy(supervised_run(images), labels)),
        "mae": (mae, lambda: mae_run(images)[0]),
        "simclr": (simclr, simclr_loss),
    }
    seconds = {name: timed(make_step(model, loss, args.precision, device), warmup=args.warmup, steps=args.steps,
                           device=device) for name, (model, loss) in losses.items()}

    print(f"device {device}, model {args.model} {args.img_size}px/{args.patch_size}, batch {args.batch}, "
          f"{args.precision}{', compiled' if args.compile else ''}")
    print(f"{'step':<12}{'images/s':>12}{'ms/step':>10}{'vs supervised':>15}")
    for name, value in seconds.items():
        print(f"{name:<12}{args.batch / value:>12.0f}{value * 1e3:>10.1f}{seconds['supervised'] / value:>14.2f}x")
    if args.mfu:
        with FlopCounterMode(display=False) as counter, torch.no_grad(), torch.autocast(
                device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            mae(images)
        flops_per_step = 3 * counter.get_total_flops()
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        peak = next((tflops for key, tflops in PEAK_TFLOPS.items() if key in name), None)
        achieved = flops_per_step / seconds["mae"] / 1e12
        mfu = f"{100 * achieved / peak:.1f}% of {peak} TFLOP/s ({name})" if peak else f"no peak known for {name}"
        print(f"mae: {flops_per_step / args.batch / 1e9:.2f} GFLOP/image (3 x forward), {achieved:.1f} TFLOP/s, "
              f"MFU {mfu}")


if __name__ == "__main__":
    main()
