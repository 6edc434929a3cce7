"""Throughput of the pretraining train steps: MAE, SimCLR and a plain supervised step on the same encoder.

Runs each step on random data (no dataset needed), after warm-up, and prints images/s and step time side by
side, with MAE's speed relative to the supervised step of the same ViT. The optimizer is the trainer's: AdamW
over its weight-decay groups, fused where PyTorch has the kernel (`pipeline_lib.core.trainer.fused_adamw`).

With `--mfu`, on any device, it also reports the FLOP/s of the MAE step, counting 3 x the forward FLOPs of the
encoder on the visible tokens plus the decoder on all tokens (torch's FlopCounterMode on one forward), as a
share of two peaks: the achievable one, a large square matmul in the step's precision (2 n^3 FLOPs, the best
of a few sizes, timed after warm-up before and after the steps in the same run), and the data sheet's dense
bf16 peak where PEAK_TFLOPS knows the GPU (bf16 only).

Examples:
    python benchmarks/pretrain_throughput.py                       # project default: tiny ViT, 8x8x1, CPU
    python benchmarks/pretrain_throughput.py --mfu --methods mae   # the MAE step's share of the matmul peak
    python benchmarks/pretrain_throughput.py --model vit_base_patch16_224 --img-size 224 --patch-size 16 \
        --channels 3 --batch 8 --methods mae --steps 5 --warmup 2 --mfu   # MAE ViT-B/16 on the CPU
    python benchmarks/pretrain_throughput.py --model vit_base_patch16_224 --img-size 224 --patch-size 16 \
        --channels 3 --batch 256 --precision bf16 --mfu --compile  # MAE ViT-B/16 on a GPU
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.optim import param_groups_weight_decay
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from pipeline_lib.core import dist
from pipeline_lib.core.trainer import fused_adamw
from pipeline_lib.vision.config import ModelParams, PretrainParams
from pipeline_lib.vision.data.augment import AugmentConfig, BatchAugment
from pipeline_lib.vision.losses import nt_xent
from pipeline_lib.vision.pretrain import build_pretrain_model

# Dense bf16 tensor-core peak of the GPUs we quote MFU for (TFLOP/s, data sheets); the first key in the device's
# name wins, so the specific variants come before the plain names.
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.5, "H100": 989.4, "H200": 989.4, "A100": 312.0}
METHODS = ("supervised", "mae", "simclr")
WEIGHT_DECAY = 0.05  # the pretrain section's default; any value costs the same


def timed(step: Callable[[], Any], *, warmup: int, steps: int, device: torch.device) -> float:
    """Seconds per step over `steps` after `warmup` untimed steps (which take any compilation), the device's queue
    drained before the clock starts and before it stops."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps


def make_optimizer(model: nn.Module) -> torch.optim.AdamW:
    """The trainer's optimizer: AdamW over weight-decay groups (none on biases, norms and the model's
    `no_weight_decay`), fused where PyTorch has the kernel for every parameter."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    groups = param_groups_weight_decay(model, WEIGHT_DECAY, no_weight_decay_list=skip)
    return torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), fused=fused_adamw(groups))


def make_step(optimizer: torch.optim.Optimizer, loss_fn: Callable[[], Tensor], precision: str,
              device: torch.device) -> Callable[[], None]:
    """One optimizer step on `loss_fn`'s loss, the forward under bf16 autocast when `precision` says."""

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def default_matmul_sizes(device: torch.device) -> tuple[int, ...]:
    """Square matmul sizes large enough to saturate the device."""
    return (4096, 8192, 16384) if device.type == "cuda" else (1024, 2048, 4096)


def matmul_peak(device: torch.device, precision: str, sizes: Sequence[int], *, steps: int = 5) -> tuple[float, int]:
    """(best FLOP/s, its size n) of an n x n by n x n matmul in the step's precision (2 n^3 FLOPs), over `sizes`."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    best = (0.0, 0)
    for n in sizes:
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        seconds = timed(lambda a=a, b=b: torch.mm(a, b), warmup=2, steps=steps, device=device)
        best = max(best, (2 * n**3 / seconds, n))
        del a, b
    return best


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def table_peak(name: str, precision: str) -> float | None:
    """The data sheet's dense bf16 peak (FLOP/s) of the device called `name`; None when unknown or not bf16."""
    tflops = next((value for key, value in PEAK_TFLOPS.items() if key in name), None)
    return tflops * 1e12 if tflops is not None and precision == "bf16" else None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit", help="'vit' (custom, see --embed-dim ...) or a timm ViT name")
    parser.add_argument("--img-size", type=int, default=8)
    parser.add_argument("--patch-size", type=int, default=2)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--embed-dim", type=int, default=64)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--num-heads", type=int, default=4)
    defaults = PretrainParams()
    parser.add_argument("--mask-ratio", type=float, default=defaults.mask_ratio)
    parser.add_argument("--decoder-embed-dim", type=int, default=defaults.decoder_embed_dim)
    parser.add_argument("--decoder-depth", type=int, default=defaults.decoder_depth)
    parser.add_argument("--decoder-num-heads", type=int, default=defaults.decoder_num_heads)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (they take the compilation)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="the steps to time")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--compile", action="store_true", help="torch.compile each model")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile's backend (eager: trace only)")
    parser.add_argument("--mfu", action="store_true", help="the MAE step's FLOP/s against the matmul and table peaks")
    parser.add_argument("--matmul-sizes", type=int, nargs="+", help="square matmul sizes for the peak "
                        "(default: 1024 2048 4096 on the CPU, 4096 8192 16384 on CUDA)")
    args = parser.parse_args(argv)
    if args.mfu and "mae" not in args.methods:
        parser.error("--mfu measures the MAE step: include mae in --methods")
    if min(args.steps, args.batch) < 1 or args.warmup < 0:
        parser.error("--steps and --batch must be >= 1, --warmup >= 0")
    return args


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Time the steps `args` asks for (and, with `args.mfu`, the MAE step's FLOP/s against the peaks)."""
    device = dist.resolve_device(args.device)
    model_cfg = ModelParams(name=args.model, img_size=args.img_size, patch_size=args.patch_size,
                            embed_dim=args.embed_dim, depth=args.depth, num_heads=args.num_heads)
    mae_cfg = PretrainParams(method="mae", mask_ratio=args.mask_ratio, decoder_embed_dim=args.decoder_embed_dim,
                             decoder_depth=args.decoder_depth, decoder_num_heads=args.decoder_num_heads)
    shape = dict(in_chans=args.channels, img_size=args.img_size)
    images = torch.rand(args.batch, args.channels, args.img_size, args.img_size, device=device)
    labels = torch.randint(0, 10, (args.batch,), device=device)
    augment, generator = BatchAugment(AugmentConfig(), args.img_size), torch.Generator().manual_seed(0)

    def compiled(module: nn.Module) -> nn.Module:
        return torch.compile(module, backend=args.compile_backend) if args.compile else module

    def model_and_loss(name: str) -> tuple[nn.Module, Callable[[], Tensor]]:
        if name == "mae":
            mae = build_pretrain_model(mae_cfg, model_cfg, **shape).to(device)
            run = compiled(mae)
            return mae, lambda: run(images)[0]
        if name == "simclr":
            simclr = build_pretrain_model(PretrainParams(method="simclr"), model_cfg, **shape).to(device)
            run = compiled(simclr)
            return simclr, lambda: nt_xent(*run(augment(images, generator), augment(images, generator)),
                                           temperature=0.2)
        encoder = build_pretrain_model(mae_cfg, model_cfg, **shape).encoder
        supervised = nn.Sequential(encoder, nn.Linear(encoder.num_features, 10)).to(device)
        run = compiled(supervised)
        return supervised, lambda: F.cross_entropy(run(images), labels)

    name = device_name(device)
    sizes = args.matmul_sizes or default_matmul_sizes(device)
    peak_before = matmul_peak(device, args.precision, sizes) if args.mfu else None
    result: dict[str, Any] = {
        "device": name, "threads": torch.get_num_threads(), "torch": torch.__version__, "model": args.model,
        "img_size": args.img_size, "patch_size": args.patch_size, "channels": args.channels, "batch": args.batch,
        "precision": args.precision, "compiled": args.compile, "steps": args.steps, "warmup": args.warmup,
        "mae_recipe": {"mask_ratio": args.mask_ratio, "decoder_embed_dim": args.decoder_embed_dim,
                       "decoder_depth": args.decoder_depth, "decoder_num_heads": args.decoder_num_heads},
        "methods": {},
    }
    models = {}
    for method in args.methods:  # the step order of the table: supervised, mae, simclr
        model, loss = model_and_loss(method)
        optimizer = make_optimizer(model)
        step = make_step(optimizer, loss, args.precision, device)
        warmup = timed(step, warmup=0, steps=args.warmup, device=device) * args.warmup if args.warmup else 0.0
        seconds = timed(step, warmup=0, steps=args.steps, device=device)
        result["methods"][method] = {"seconds_per_step": seconds, "images_per_second": args.batch / seconds,
                                     "warmup_seconds": warmup}  # with any compilation
        result["fused_adamw"] = bool(optimizer.defaults["fused"])
        models[method] = model
    if args.mfu:
        peak_after = matmul_peak(device, args.precision, sizes)
        flops, size = max(peak_before, peak_after)
        result["mfu"] = mae_utilisation(models["mae"], images, args.precision, device,
                                        result["methods"]["mae"]["seconds_per_step"], (flops, size), name)
        result["mfu"]["matmul_tflops_before_after"] = [peak_before[0] / 1e12, peak_after[0] / 1e12]
    return result


def mae_utilisation(mae: nn.Module, images: Tensor, precision: str, device: torch.device, seconds: float,
                    peak: tuple[float, int], name: str) -> dict[str, Any]:
    """The MAE step's FLOPs (3 x one forward's, by FlopCounterMode) and FLOP/s, as shares of the matmul `peak`
    (FLOP/s, size) and of the table's peak for the device called `name`."""
    with FlopCounterMode(display=False) as counter, torch.no_grad(), torch.autocast(
            device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        mae(images)
    flops_per_step = 3 * counter.get_total_flops()
    achieved = flops_per_step / seconds
    sheet = table_peak(name, precision)
    return {
        "gflop_per_image": flops_per_step / len(images) / 1e9,
        "achieved_tflops": achieved / 1e12,
        "matmul_peak_tflops": peak[0] / 1e12,
        "matmul_size": peak[1],
        "share_of_matmul_peak": achieved / peak[0],
        "table_peak_tflops": sheet / 1e12 if sheet else None,
        "mfu": achieved / sheet if sheet else None,
    }


def report(result: dict[str, Any]) -> str:
    """The printed table of `measure`'s result."""
    lines = [f"device {result['device']} ({result['threads']} threads), model {result['model']} "
             f"{result['img_size']}px/{result['patch_size']}, batch {result['batch']}, {result['precision']}"
             f"{', compiled' if result['compiled'] else ''}, AdamW fused={result['fused_adamw']}",
             f"{'step':<12}{'images/s':>12}{'ms/step':>10}{'vs supervised':>15}"]
    methods = result["methods"]
    for method, timing in methods.items():
        ratio = (f"{methods['supervised']['seconds_per_step'] / timing['seconds_per_step']:>14.2f}x"
                 if "supervised" in methods else "")
        lines.append(f"{method:<12}{timing['images_per_second']:>12.1f}{timing['seconds_per_step'] * 1e3:>10.1f}"
                     f"{ratio}")
    if "mfu" in result:
        mfu = result["mfu"]
        before, after = mfu["matmul_tflops_before_after"]
        sheet = (f"MFU {100 * mfu['mfu']:.1f}% of the table's {mfu['table_peak_tflops']} TFLOP/s" if mfu["mfu"]
                 else f"no table peak for {result['device']} in {result['precision']}")
        lines.append(f"mae: {mfu['gflop_per_image']:.2f} GFLOP/image (3 x forward), {mfu['achieved_tflops']:.4g} "
                     f"TFLOP/s = {100 * mfu['share_of_matmul_peak']:.1f}% of the {result['precision']} matmul peak "
                     f"{mfu['matmul_peak_tflops']:.4g} TFLOP/s (n={mfu['matmul_size']}; {before:.4g} before, "
                     f"{after:.4g} after the steps); {sheet}")
    return "\n".join(lines)


def main() -> None:
    print(report(measure(parse_args())))


if __name__ == "__main__":
    main()
