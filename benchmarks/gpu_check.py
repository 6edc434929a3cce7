"""The project on an NVIDIA GPU in one command, in under 8 minutes on one H100 or H200.

1. pipeline: the default pipeline's vision stages (fetch to rl) with `device: cuda`, in a committed copy of the
   project in a temporary git repo, one `dvc repro --single-item` per stage: each stage's wall time (DVC's
   start-up included) and its headline metrics (`HEADLINES`).
2. mae_steps: MAE ViT-B/16 pretraining steps on 224x224 images in bf16 with fused AdamW, torch.compile off and
   on, by `pretrain_throughput.measure` (the compilation happens in the untimed warm-up steps). The MAE paper's
   ViT-B recipe: 75% of the patches masked, a decoder of 8 blocks 512 wide. Images/s, MFU against the data
   sheet's dense bf16 peak (`pretrain_throughput.PEAK_TFLOPS`), and the share of the bf16 matmul peak measured
   in the same run.
3. Everything goes to `<out>/gpu_check.json` and a Markdown table `<out>/gpu_check.md`, both rewritten after
   each part, so a part that fails or runs out of time leaves the others' figures. A failed part is recorded
   with its error, and the script then exits with status 1.

Run it from the repository root, with the project installed (`pip install -e .`) and `dvc` on the PATH:

    python benchmarks/gpu_check.py --out gpu_check            # both parts
    python benchmarks/gpu_check.py --out gpu_check --parts mae_steps --batch 128

`--smoke` runs the same code on the CPU at toy size in about a minute, for the tests: a tiny ViT on 32x32 images
(torch.compile with the `eager` backend, which traces without generating code), and only `fetch` and `pretrain`
of the stage tests' toy project, pretraining for 2 epochs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pretrain_throughput as throughput
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore", ".dvc/config")
PROJECT_DIRS = ("stages", "pipeline_lib")
EMPTY_DIRS = ("data/raw", "data/text/tasks")  # kept in git by a .gitkeep; fetch depends on data/raw
VISION_STAGES = ("fetch", "pretrain", "finetune", "finetune_scratch", "evaluate", "rl")
SMOKE_STAGES = ("fetch", "pretrain")
STAGE_TIMEOUT_S = 600
# The figures of each stage's metrics/<stage>.json worth a glance (those the file has).
TRAINING = ("loss", "train_accuracy", "images_per_second", "train_seconds")
HEADLINES = {
    "pretrain": TRAINING, "finetune": TRAINING, "finetune_scratch": TRAINING,
    "evaluate": ("ssl.top1", "scratch.top1", "baselines.pixels_logreg.top1", "baselines.pixels_svm.top1",
                 "encoder.knn_top1", "encoder.linear_probe_top1"),
    "rl": ("reference.reward_greedy", "post_trained.reward_greedy", "post_trained.accuracy"),
}
# The models of the timed steps, as pretrain_throughput arguments.
VIT_B16 = ["--model", "vit_base_patch16_224", "--img-size", "224", "--patch-size", "16", "--channels", "3",
           "--mask-ratio", "0.75", "--decoder-embed-dim", "512", "--decoder-depth", "8", "--decoder-num-heads", "16"]
TOY_VIT = ["--model", "vit", "--img-size", "32", "--patch-size", "4", "--channels", "3", "--embed-dim", "32",
           "--depth", "1", "--num-heads", "2", "--decoder-embed-dim", "32", "--decoder-depth", "1",
           "--decoder-num-heads", "2", "--compile-backend", "eager", "--matmul-sizes", "256"]
PARTS = ("pipeline", "mae_steps")


def gpu_params(params: dict[str, Any]) -> None:
    """The default pipeline on the GPU."""
    params["device"] = "cuda"


def toy_params(params: dict[str, Any]) -> None:
    """The stage tests' toy vision track (`_toy_params` in tests/stages/conftest.py) on the CPU, pretraining for 2
    epochs of 5 steps."""
    params["device"] = "cpu"
    params["data"]["max_images"] = 200  # 160 unlabeled, 16 labeled, 16 rl, 40 test images
    params["model"].update(embed_dim=32, depth=1, num_heads=2)
    params["pretrain"].update(epochs=2, batch_size=32, warmup_epochs=1.0, decoder_embed_dim=32, decoder_depth=1,
                              decoder_num_heads=2)


def command_env() -> dict[str, str]:
    """The environment of the commands run in the copy: no DVC analytics, a git identity, and no
    MLFLOW_TRACKING_URI, so the stages log to the copy's own store."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "gpu-check", "GIT_COMMITTER_NAME": "gpu-check",
           "GIT_AUTHOR_EMAIL": "gpu-check@example.com", "GIT_COMMITTER_EMAIL": "gpu-check@example.com"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def copy_project(repo: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """A committed git repo at `repo` holding the project's pipeline, with the params `edit` changes."""
    for name in PROJECT_FILES:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, repo / name)
    for name in PROJECT_DIRS:
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in EMPTY_DIRS:
        (repo / name).mkdir(parents=True, exist_ok=True)
        (repo / name / ".gitkeep").touch()
    params = yaml.safe_load((repo / "params.yaml").read_text())
    edit(params)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for command in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-q", "-m", "project"]):
        subprocess.run(command, cwd=repo, check=True, capture_output=True, env=command_env())


def headline(metrics_file: Path, keys: tuple[str, ...]) -> dict[str, float]:
    """The `keys` (dotted) that `metrics_file` holds, with their values."""
    if not metrics_file.is_file():
        return {}
    metrics, found = json.loads(metrics_file.read_text()), {}
    for key in keys:
        value: Any = metrics
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, (int, float)):
            found[key] = value
    return found


def run_pipeline(stages: tuple[str, ...], edit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Reproduce `stages` one by one in a fresh copy of the project; each stage's wall time and headline figures."""
    result: dict[str, Any] = {"stages": {}}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        repo = Path(tmp)
        copy_project(repo, edit)
        result["params"] = {"device": yaml.safe_load((repo / "params.yaml").read_text())["device"]}
        for stage in stages:
            started = time.perf_counter()
            done = subprocess.run(["dvc", "repro", "--single-item", stage], cwd=repo, capture_output=True, text=True,
                                  env=command_env(), timeout=STAGE_TIMEOUT_S)
            seconds = time.perf_counter() - started
            if done.returncode:
                tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
                raise RuntimeError(f"dvc repro {stage} exited {done.returncode} after {seconds:.0f} s:\n{tail}")
            metrics = headline(repo / "metrics" / f"{stage}.json", HEADLINES.get(stage, ()))
            result["stages"][stage] = {"seconds": seconds, "metrics": metrics}
    result["total_seconds"] = sum(stage["seconds"] for stage in result["stages"].values())
    return result


def run_mae_steps(model: list[str], *, device: str, batch: int, steps: int, warmup: int) -> dict[str, Any]:
    """MAE steps in bf16 with torch.compile off (`eager`) and on (`compiled`): `pretrain_throughput.measure`'s
    results, with the wall time of each measurement (warm-up, compilation and matmul peaks included)."""
    result = {}
    for name, compiled in (("eager", False), ("compiled", True)):
        argv = [*model, "--batch", str(batch), "--steps", str(steps), "--warmup", str(warmup), "--methods", "mae",
                "--precision", "bf16", "--device", device, "--mfu", *(["--compile"] if compiled else [])]
        started = time.perf_counter()
        result[name] = throughput.measure(throughput.parse_args(argv))
        result[name]["wall_seconds"] = time.perf_counter() - started
        if device == "cuda":  # the next measurement starts with the GPU's memory free
            torch.cuda.empty_cache()
    return result


def markdown(report: dict[str, Any]) -> str:
    """The report's figures as two short Markdown tables."""
    lines = [f"# GPU check: {report['device']}{' (smoke)' if report['smoke'] else ''}", ""]
    pipeline = report.get("pipeline", {})
    if pipeline.get("stages"):
        lines += [f"Pipeline, `device: {pipeline['params']['device']}` (wall s: dvc repro of each stage)", "",
                  "| stage | wall s | headline |", "|---|---:|---|"]
        for stage, done in pipeline["stages"].items():
            figures = ", ".join(f"{key} {value:.4g}" for key, value in done["metrics"].items())
            lines.append(f"| {stage} | {done['seconds']:.1f} | {figures} |")
        lines += [f"| total | {pipeline['total_seconds']:.1f} | |", ""]
    steps = report.get("mae_steps", {})
    if any(name in steps for name in ("eager", "compiled")):
        lines += ["MAE steps, bf16, fused AdamW", "",
                  "| model | compile | batch | images/s | ms/step | warm-up s | TFLOP/s | MFU | of matmul peak |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name in ("eager", "compiled"):
            if name not in steps:
                continue
            done, mae, mfu = steps[name], steps[name]["methods"]["mae"], steps[name]["mfu"]
            sheet = f"{100 * mfu['mfu']:.1f}% of {mfu['table_peak_tflops']}" if mfu["mfu"] else "n/a"
            lines.append(f"| {done['model']} {done['img_size']}px/{done['patch_size']} | {name} | {done['batch']} | "
                         f"{mae['images_per_second']:.1f} | {1e3 * mae['seconds_per_step']:.1f} | "
                         f"{mae['warmup_seconds']:.1f} | {mfu['achieved_tflops']:.4g} | {sheet} | "
                         f"{100 * mfu['share_of_matmul_peak']:.1f}% of {mfu['matmul_peak_tflops']:.4g} |")
        lines.append("")
    errors = [f"- {part}: {report[part]['error'].splitlines()[0]}" for part in PARTS if report.get(part, {}).get(
        "error")]
    return "\n".join(lines + (["Failed:", *errors, ""] if errors else []))


def write_report(out: Path, report: dict[str, Any]) -> None:
    """`<out>/gpu_check.json` and `<out>/gpu_check.md`, each written whole (a temporary file renamed into place)."""
    for name, text in (("gpu_check.json", json.dumps(report, indent=2) + "\n"), ("gpu_check.md", markdown(report))):
        partial = out / f".{name}.tmp"
        partial.write_text(text)
        partial.replace(out / name)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--smoke", action="store_true", help="the CPU at toy size (the tests)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--batch", type=int, help="images per MAE step (default: 256; smoke: 8)")
    parser.add_argument("--steps", type=int, help="timed MAE steps (default: 20; smoke: 2)")
    parser.add_argument("--warmup", type=int, help="untimed MAE steps first, with the compilation (default: 5; "
                        "smoke: 1)")
    args = parser.parse_args()
    for name, default in {"batch": (256, 8), "steps": (20, 2), "warmup": (5, 1)}.items():
        if getattr(args, name) is None:
            setattr(args, name, default[args.smoke])
    if min(args.batch, args.steps) < 1 or args.warmup < 1:
        parser.error("--batch, --steps and --warmup must be >= 1")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out}: is a file; give a folder")
    if not args.smoke and not torch.cuda.is_available():
        parser.error("CUDA is not available on this machine; run on an NVIDIA GPU, or add --smoke for the CPU toy run")
    if "pipeline" in args.parts and shutil.which("dvc") is None:
        parser.error("dvc is not on the PATH; install the project (pip install -e .) or leave out --parts pipeline")
    return args


def main() -> None:
    args = parse_args()
    device = "cpu" if args.smoke else "cuda"
    report: dict[str, Any] = {
        "smoke": args.smoke, "device": throughput.device_name(torch.device(device)), "torch": torch.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    work = {
        "pipeline": lambda: run_pipeline(SMOKE_STAGES if args.smoke else VISION_STAGES,
                                         toy_params if args.smoke else gpu_params),
        "mae_steps": lambda: run_mae_steps(TOY_VIT if args.smoke else VIT_B16, device=device, batch=args.batch,
                                           steps=args.steps, warmup=args.warmup),
    }
    for part in args.parts:
        print(f"gpu_check: {part} ...", flush=True)
        try:
            report[part] = {**work[part](), "error": None}
        except Exception as err:  # recorded with its error; the other part still runs
            report[part] = {"error": f"{type(err).__name__}: {err}"}
        report.pop("total_seconds", None)  # kept after the parts
        report["total_seconds"] = time.perf_counter() - started
        write_report(args.out, report)
    print(markdown(report))
    failed = [part for part in args.parts if report[part]["error"]]
    if failed:
        sys.exit(f"gpu_check: {', '.join(failed)} failed; see {args.out / 'gpu_check.json'}")


if __name__ == "__main__":
    main()
