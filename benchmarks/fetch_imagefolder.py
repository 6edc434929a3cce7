"""Fetch speed and memory of an image folder: the loader before this change, a plain PIL loop and the pooled fetch,
as ratios in one run; then the loader that feeds training from the prepared store.

Generates 256x256 JPEGs (smooth random pictures, about 26 KB each) in ten class folders under a temporary folder,
the largest size once (smaller sizes are hard-linked subsets), and resizes them to 224 (`data.image_size`). For each
size it measures, each fetch in a subprocess of its own (images/s, and peak RSS: the largest process, from `wait4`,
and the whole process tree's PSS, sampled from /proc):

- plain: one process opens, converts and resizes every file with PIL and stacks nothing (the one-core floor);
- before: `prepare_dataset` as of commit `--baseline` (the loader that decodes every image into a list, then
  stacks), read from git into a temporary package: this benchmark keeps no copy of it. It is skipped where the
  ~15x the pixel bytes it needs would not fit in memory, and it runs under an address-space limit, so that it
  fails with a MemoryError instead of pushing other processes out;
- after: `prepare_dataset` with `--workers` decoding processes; its output must equal before's byte for byte;
- stage: `python -m stages.fetch` (start-up, MLflow run and logging included) on a temporary MLflow store.

Then the loader: the vision trainer's own `load_inputs` over shuffled batches of the prepared unlabeled split to the
training device at 224x224, from the memory map (as the trainer reads) and with file reads (`StoredImages.take`):
images/s and peak RSS, anonymous and file-backed. Last, a projection for ImageNet-1k from the largest size.

On a shared machine, wall times depend on what else runs; the CPU seconds per image do much less.

Examples:
    python benchmarks/fetch_imagefolder.py --sizes 6000 24000 --workers 2     # the issue's measurement
    python benchmarks/fetch_imagefolder.py --smoke                            # a few images, every part
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "3c9482a"  # the last commit whose imagefolder loader decodes every image into a list
BEFORE_MODULES = ("sources", "store", "prepare")  # pipeline_lib/vision/data/*.py, read from the baseline commit
CLASSES = 10
SOURCE_SIDE = 256
IMAGENET = {"images": 1_281_167, "val": 50_000}
IMAGENET_SIDE = (500, 375)  # (width, height) of a typical ImageNet JPEG (the mean is about 400 x 350)
WRITER_IMAGES_PER_SECOND = 4000  # 224x224 rows one process hashes (sha256) and writes per second, roughly


# ------------------------------------------------------------------------------------------ the image folder


def _write_jpegs(task: tuple[list[str], int | tuple[int, int], int]) -> None:
    """Smooth random pictures: 8x8 colour noise upscaled, plus fine grain, saved as JPEG quality 90."""
    from PIL import Image

    paths, side, seed = task
    width, height = (side, side) if isinstance(side, int) else side
    rng = np.random.default_rng(seed)
    for path in paths:
        coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((width, height),
                                                                                        Image.Resampling.BICUBIC)
        grain = rng.normal(0.0, 6.0, (height, width, 3))
        pixels = np.clip(np.asarray(coarse, dtype=np.float64) + grain, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(path, quality=90)


def make_folder(root: Path, count: int, side: int | tuple[int, int], workers: int) -> Path:
    """`count` JPEGs of `side` x `side` (or (width, height)) in CLASSES folders under `root`, by `workers` processes."""
    paths = [str(root / f"class{i % CLASSES}" / f"{i // CLASSES:06d}.jpg") for i in range(count)]
    for c in range(CLASSES):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    tasks = [(paths[start : start + 200], side, start) for start in range(0, count, 200)]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write_jpegs, tasks))
    return root


def subset(full: Path, root: Path, count: int) -> Path:
    """The first `count / CLASSES` files of each class of `full`, hard-linked under `root`."""
    for c in range(CLASSES):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for file in sorted((full / f"class{c}").iterdir())[: count // CLASSES]:
            os.link(file, root / f"class{c}" / file.name)
    return root


# --------------------------------------------------------------------------------------------- measuring


def _descendants(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo.extend(parents.get(found[-1], []))
    return found


def _pss_kb(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    match = re.search(r"^Pss:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else 0


def run_measured(command: list[str], env: dict[str, str] | None = None, limit_bytes: int | None = None
                 ) -> dict[str, Any]:
    """Run `command`; its wall time, exit status, output, peak RSS of its largest process (wait4) and the peak PSS
    of its process tree (sampled every 50 ms)."""
    def set_limit() -> None:
        if limit_bytes is not None:
            resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, resource.RLIM_INFINITY))

    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, preexec_fn=set_limit)
    peak_pss, done = [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peak_pss[0] = max(peak_pss[0], sum(_pss_kb(p) for p in _descendants(process.pid)))

    sampler = threading.Thread(target=sample, daemon=True)
    if Path("/proc/self/smaps_rollup").exists():
        sampler.start()
    captured: dict[str, str] = {}

    def read() -> None:  # the pipes; wait4 below reaps the process and gives its rusage
        captured["out"], captured["err"] = process.stdout.read(), process.stderr.read()  # type: ignore[union-attr]

    reader = threading.Thread(target=read)
    reader.start()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    reader.join()
    done.set()
    return {"seconds": seconds, "returncode": process.returncode, "stdout": captured["out"], "stderr": captured["err"],
            "cpu_seconds": usage.ru_utime + usage.ru_stime, "rss_mb": usage.ru_maxrss / 1024,
            "tree_pss_mb": peak_pss[0] / 1024}


def _available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 8 << 30


# ------------------------------------------------------------------------------------------ what is timed


def plain_loop(folder: str, size: int, limit: int | None = None) -> dict[str, float]:
    """Open, convert and resize every file (or the first `limit`) with PIL in this one process, keeping nothing."""
    from PIL import Image

    files = sorted(str(p) for p in Path(folder).rglob("*.jpg"))[:limit]
    started, cpu = time.perf_counter(), time.process_time()
    for path in files:
        with Image.open(path) as image:
            image = image.convert("RGB")
            scale = size / min(image.size)
            width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
            image = image.resize((width, height), Image.Resampling.BICUBIC)
            left, top = (width - size) // 2, (height - size) // 2
            np.asarray(image.crop((left, top, left + size, top + size)))
    return {"images": len(files), "fetch_seconds": time.perf_counter() - started,
            "decode_cpu_seconds": time.process_time() - cpu}


def before_package(baseline: str, into: Path) -> Path | None:
    """`pipeline_lib/vision/data/{sources,store,prepare}.py` of commit `baseline` as the package `fetch_before`
    under `into`; None when this clone lacks the commit (a shallow clone)."""
    known = subprocess.run(["git", "cat-file", "-e", f"{baseline}^{{commit}}"], cwd=ROOT, capture_output=True)
    if known.returncode != 0:
        return None
    package = into / "fetch_before"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for name in BEFORE_MODULES:
        text = subprocess.run(["git", "show", f"{baseline}:pipeline_lib/vision/data/{name}.py"], cwd=ROOT,
                              check=True, capture_output=True, text=True).stdout
        for other in BEFORE_MODULES:
            text = text.replace(f"pipeline_lib.vision.data.{other} import", f"fetch_before.{other} import")
        (package / f"{name}.py").write_text(text)
    return into


def fetch(which: str, folder: str, out: str, size: int, workers: int) -> dict[str, Any]:
    """`prepare_dataset` (before's or the current one) on `folder`, timed in this process."""
    from pipeline_lib.vision.config import DataParams

    if which == "before":
        from fetch_before.prepare import prepare_dataset  # type: ignore[import-not-found]
        kwargs: dict[str, Any] = {}
    else:
        from pipeline_lib.vision.data.prepare import prepare_dataset
        kwargs = {"workers": workers}
    cfg = DataParams(source="imagefolder", path=folder, image_size=size)
    started = time.perf_counter()
    metas = prepare_dataset(cfg, 0, Path(out), Path(out).parent / "cache", **kwargs)
    return {"images": sum(m["num_images"] for m in metas.values()), "fetch_seconds": time.perf_counter() - started,
            "sha256": {name: m["sha256"]["images.npy"] for name, m in metas.items()},
            "pixel_mean": metas["unlabeled"]["pixel_mean"], "pixel_std": metas["unlabeled"]["pixel_std"]}


def loader(prepared: str, batch_size: int, batches: int, reads: str) -> dict[str, Any]:
    """The vision trainer's `load_inputs` over shuffled batches of the unlabeled split, to the training device: from
    its memory map (`reads="memmap"`, as the trainer reads), or with file reads (`"file"`: `StoredImages.take`)."""
    from types import SimpleNamespace

    import torch

    from pipeline_lib.vision.data.store import StoredImages, read_split
    from pipeline_lib.vision.models.preprocess import Preprocess
    from pipeline_lib.vision.trainer import ImageTrainer

    split = read_split(Path(prepared), "unlabeled")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    side = split.images.shape[1]
    rows = split.images if reads == "memmap" else _Taken(StoredImages(Path(prepared) / "unlabeled" / "images.npy"))
    trainer = SimpleNamespace(inputs=rows, device=device,
                              preprocess=Preprocess(split.meta["pixel_mean"], split.meta["pixel_std"], side).to(device))
    order = np.random.default_rng(0).permutation(len(split))
    batches = min(batches, len(order) // batch_size)
    started = time.perf_counter()
    for b in range(batches):
        index = np.sort(order[b * batch_size : (b + 1) * batch_size])
        images = ImageTrainer.load_inputs(trainer, index)  # type: ignore[arg-type]  # the trainer's own code
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    status = dict(re.findall(r"^(\w+):\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE))
    return {"images": batches * batch_size, "load_seconds": seconds, "device": str(device), "reads": reads,
            "shape": list(images.shape),
            "threads": torch.get_num_threads(), "rss_anon_mb": int(status.get("RssAnon", 0)) / 1024,
            "rss_file_mb": int(status.get("RssFile", 0)) / 1024, "vm_hwm_mb": int(status.get("VmHWM", 0)) / 1024}


class _Taken:
    """`rows[index]` by `StoredImages.take`, so that `load_inputs` reads a batch with file reads."""

    def __init__(self, stored: Any) -> None:
        self.stored = stored

    def __getitem__(self, index: np.ndarray) -> np.ndarray:
        return self.stored.take(index)


def _child(args: argparse.Namespace) -> None:
    """One measured part, run in a subprocess of its own: prints its result as JSON on the last line."""
    if args.part == "plain":
        result = plain_loop(args.folder, args.size)
    elif args.part.startswith("loader-"):
        result = loader(args.out, args.batch_size, args.batches, args.part.removeprefix("loader-"))
    else:
        result = fetch(args.part, args.folder, args.out, args.size, args.workers)
    print(json.dumps(result))


# --------------------------------------------------------------------------------------------- the run


def _part(args: argparse.Namespace, part: str, folder: Path, out: Path, limit: int | None = None,
          env: dict[str, str] | None = None) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--part", part, "--folder", str(folder), "--out",
               str(out), "--size", str(args.size), "--workers", str(args.workers), "--batch-size",
               str(args.batch_size), "--batches", str(args.batches)]
    done = run_measured(command, env=env, limit_bytes=limit)
    if done["returncode"] != 0:
        last = (done["stderr"].strip().splitlines() or ["?"])[-1]
        return {"failed": last[:200], "rss_mb": done["rss_mb"], "tree_pss_mb": done["tree_pss_mb"]}
    return {**json.loads(done["stdout"].strip().splitlines()[-1]), "seconds": done["seconds"],
            "cpu_seconds": done["cpu_seconds"], "rss_mb": done["rss_mb"], "tree_pss_mb": done["tree_pss_mb"]}


def _stage(args: argparse.Namespace, folder: Path, work: Path) -> dict[str, Any]:
    """`python -m stages.fetch` as DVC runs it, with the project's params but this folder, on its own MLflow store."""
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(source="imagefolder", path=str(folder), url=None, sha256=None, image_size=args.size,
                          max_images=None)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    uri = f"sqlite:///{work / 'mlflow.db'}"
    subprocess.run([sys.executable, "-c", f"import mlflow; mlflow.MlflowClient({uri!r}).search_experiments()"],
                   check=True, capture_output=True)  # a project's store exists: create this one before the clock runs
    command = [sys.executable, "-m", "stages.fetch", "--params", str(work / "params.yaml"), "--out",
               str(work / "prepared"), "--cache-dir", str(work / "cache")]
    done = run_measured(command, env={"MLFLOW_TRACKING_URI": uri})
    result = {key: done[key] for key in ("seconds", "cpu_seconds", "rss_mb", "tree_pss_mb")}
    if done["returncode"] != 0:
        result["failed"] = (done["stderr"].strip().splitlines() or ["?"])[-1][:200]
    return result


def _rate(result: dict[str, Any], key: str = "fetch_seconds") -> float:
    return result["images"] / result[key] if "images" in result else float("nan")


def measure_size(args: argparse.Namespace, full: Path, count: int, work: Path) -> dict[str, Any]:
    folder = full if count == args.sizes[-1] else subset(full, work / f"folder-{count}", count)
    pixels = count * args.size * args.size * 3
    results: dict[str, Any] = {"count": count, "pixel_mb": pixels / 2**20}
    results["plain"] = _part(args, "plain", folder, work / "unused")
    needed, available = 17 * pixels + (1 << 29), _available_bytes()  # measured: 16.6x at 2400 images
    if args.before_note is None and needed < 0.6 * available:
        results["before"] = _part(args, "before", folder, work / f"before-{count}" / "prepared",
                                  limit=int(0.6 * available),
                                  env={"PYTHONPATH": os.pathsep.join([str(work / "before"), str(ROOT)])})
    else:
        results["before"] = {"skipped": args.before_note or f"skipped: needs about {needed / 2**30:.1f} GB, "
                             f"{available / 2**30:.1f} GB available"}
    results["after"] = _part(args, "after", folder, work / f"after-{count}" / "prepared")
    if args.stage and (count == args.sizes[-1] or not args.smoke):
        (work / f"stage-{count}").mkdir()
        results["stage"] = _stage(args, folder, work / f"stage-{count}")
    before, after = results["before"], results["after"]
    if "sha256" in before and "sha256" in after:
        results["identical"] = before["sha256"] == after["sha256"] and before["pixel_mean"] == after["pixel_mean"]
    if count == args.sizes[-1] and "sha256" in after:
        for reads in ("memmap", "file"):
            results[f"loader-{reads}"] = _part(args, f"loader-{reads}", folder, work / f"after-{count}" / "prepared")
    shutil.rmtree(work / f"before-{count}", ignore_errors=True)
    return results


def report(r: dict[str, Any], args: argparse.Namespace) -> None:
    """One size's table, ratios, stage and loader lines."""
    plain, before, after, workers = r["plain"], r["before"], r["after"], args.workers
    print(f"\n{r['count']} images of {args.side}x{args.side} -> {args.size}x{args.size} "
          f"({r['pixel_mb']:.0f} MB of pixels)")
    rows = [("plain PIL loop, 1 process", plain), ("before (list, then stack)", before),
            (f"after ({workers} workers)", after)]
    print(f"  {'':30s} {'images/s':>8s} {'fetch s':>7s} {'process s':>9s} {'CPU s':>6s} {'img/CPU-s':>9s} "
          f"{'peak RSS MB':>11s} {'tree PSS MB':>11s}")
    for name, row in rows:
        if "images" not in row:
            print(f"  {name:30s} {row.get('skipped') or 'failed: ' + row['failed']}"
                  + (f" (peak RSS {row['rss_mb']:.0f} MB)" if "rss_mb" in row else ""))
            continue
        print(f"  {name:30s} {_rate(row):8.0f} {row['fetch_seconds']:7.2f} {row['seconds']:9.2f} "
              f"{row['cpu_seconds']:6.1f} {_rate(row, 'cpu_seconds'):9.0f} {row['rss_mb']:11.0f} "
              f"{row['tree_pss_mb']:11.0f}")
    if "images" in after:
        print(f"  after / plain loop: {_rate(after) / _rate(plain):.2f}x the rate", end="")
        if "images" in before:
            print(f"; after / before: {_rate(after) / _rate(before):.2f}x the rate, "
                  f"{before['rss_mb'] / after['rss_mb']:.1f}x less peak RSS", end="")
        print()
    if "identical" in r:
        print(f"  output identical to before's, byte for byte: {'yes' if r['identical'] else 'NO'}")
    if "stage" in r:
        stage = r["stage"]
        extra = f" FAILED: {stage['failed']}" if "failed" in stage else ""
        print(f"  whole stage (python -m stages.fetch, start-up and MLflow included): {stage['seconds']:.2f} s "
              f"({stage['cpu_seconds']:.1f} CPU s) = {stage['seconds'] / plain['fetch_seconds']:.2f}x the plain loop's "
              f"time; peak RSS {stage['rss_mb']:.0f} MB, tree PSS {stage['tree_pss_mb']:.0f} MB{extra}")
    for reads, how in (("memmap", "from the memory map, as it reads"), ("file", "with file reads, StoredImages.take")):
        load = r.get(f"loader-{reads}", {})
        if "images" in load:
            print(f"  loader (trainer's load_inputs {how}; {load['images']} images of the unlabeled split -> "
                  f"{load['device']} as {load['shape']}, {load['threads']} threads): {_rate(load, 'load_seconds'):.0f} "
                  f"images/s; peak RSS {load['vm_hwm_mb']:.0f} MB (at the end: anon {load['rss_anon_mb']:.0f} MB, "
                  f"file-backed {load['rss_file_mb']:.0f} MB)")


def projection(r: dict[str, Any], args: argparse.Namespace, full: Path, work: Path) -> None:
    """ImageNet-1k at this image size, from the largest size's measured rate and memory, with the decoding cost of
    an ImageNet-sized JPEG (IMAGENET_SIDE, about the set's mean) relative to the generated ones."""
    after, workers, size = r["after"], args.workers, args.size
    if "images" not in after:
        return
    count = 20 if args.smoke else 300
    make_folder(work / "imagenet-like", count, IMAGENET_SIDE, workers=args.workers)
    big = plain_loop(str(work / "imagenet-like"), size)["decode_cpu_seconds"] / count
    small = plain_loop(str(full), size, limit=count)["decode_cpu_seconds"] / count
    row = size * size * 3
    train, val = IMAGENET["images"], IMAGENET["val"]
    per_core = _rate(after, "cpu_seconds") * small / big  # CPU seconds: a shared machine's wall time understates
    disk = (train * 1.2 + val) * row  # unlabeled (all of train) + labeled and rl (10% each) + test (val)
    print(f"\nImageNet-1k projection ({train:,} train + {val:,} val images -> {size}x{size}x3): measured "
          f"{_rate(after):.0f} images/s on {workers} workers, {_rate(after, 'cpu_seconds'):.0f} images per CPU-second "
          f"on {args.side}x{args.side} JPEGs; a {IMAGENET_SIDE[0]}x{IMAGENET_SIDE[1]} JPEG costs {big / small:.1f}x "
          f"as much to decode ({big * 1e3:.1f} ms), so about {per_core:.0f} images per core-second:")
    for cores in (workers, 16, 64, 256):
        rate = min(per_core * cores, WRITER_IMAGES_PER_SECOND)  # one process hashes and writes every row
        print(f"  {cores:3d} cores on one machine: {(train + val) / rate / 60:4.0f} min"
              + ("  (the writer's pace: shard over machines, see the README)" if rate < per_core * cores else ""))
    print(f"  disk: {disk / 1e9:.0f} GB of prepared uint8 (unlabeled {train * row / 1e9:.0f} GB), plus the JPEGs; "
          f"memory: as measured here, {after['rss_mb']:.0f} MB peak RSS, whatever the count")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[6000, 24000], help="image counts, ascending")
    parser.add_argument("--size", type=int, default=224, help="data.image_size")
    parser.add_argument("--workers", type=int, default=2, help="decoding processes of the new fetch")
    parser.add_argument("--baseline", default=BASELINE, help="commit of the loader to compare with ('' to skip)")
    parser.add_argument("--no-stage", dest="stage", action="store_false", help="skip `python -m stages.fetch`")
    parser.add_argument("--batch-size", type=int, default=128, help="loader batch")
    parser.add_argument("--batches", type=int, default=100, help="loader batches timed, at most an epoch")
    parser.add_argument("--smoke", action="store_true", help="a tiny run of every part (for the tests)")
    parser.add_argument("--keep", type=Path, help="generate the folder here and keep it (reused when present)")
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part:
        return _child(args)
    if args.smoke:
        args.sizes, args.size, args.batch_size, args.batches = [40, 60], 56, 8, 4
    args.sizes, args.side = sorted(args.sizes), 64 if args.smoke else SOURCE_SIDE
    work = Path(tempfile.mkdtemp(prefix="fetch-imagefolder-"))
    try:
        full = args.keep or work / "folder"
        if not (full / "class0").is_dir():
            started = time.perf_counter()
            make_folder(full, args.sizes[-1], args.side, workers=args.workers)
            print(f"generated {args.sizes[-1]} JPEGs in {time.perf_counter() - started:.1f} s")
        args.before_note = "skipped: no --baseline" if not args.baseline else None
        if args.baseline and before_package(args.baseline, work / "before") is None:
            args.before_note = f"skipped: commit {args.baseline} is not in this clone"
        results = [measure_size(args, full, count, work) for count in args.sizes]
        for r in results:
            report(r, args)
        projection(results[-1], args, full, work)
        print("\nJSON " + json.dumps(results))
        if any(r.get("identical") is False for r in results):
            sys.exit("fetch_imagefolder: the pooled fetch's output differs from the baseline's")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
