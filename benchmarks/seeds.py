"""Reproduce the pipeline (or some of its stages) for several seeds; mean and spread of its metrics over them.

Each seed runs a real `dvc repro <targets>` in its own copy of the project: the working tree as it is (the files
git tracks and the untracked ones it does not ignore), without the lock files and the outs DVC writes, committed
into a fresh git repo, with the top-level `seed` and the `-S` overrides set in its params.yaml. The download cache
(data/cache) is shared by a symlink, not fetched again; other inputs git ignores (data/raw) are copied, hard-linked
where possible. Copies run `--jobs` at a time, each with OpenMP/MKL threads = cores / jobs. A copy's stages log to
its own MLflow store (MLFLOW_TRACKING_URI is unset for them), so a benchmark moves no alias in the project's registry.

The metrics are read from each copy's `metrics/**/*.json`, flattened to `file:dotted.key` (file relative to
metrics/, e.g. `evaluate.json:ssl.top1`, `text/task.json:rl_ar.accuracy`), and reported as the mean, sample std,
min and max over the seeds that finished, beside each seed's value. `--metric` takes globs over those names; by
default the headline keys of the targets' own metrics files (HEADLINES; every non-timing key of a file it does
not name). A seed that fails is reported with its stage's error line and the others still report (exit status 1).
Bad input (a target, an `-S` key or value, a metric glob) stops before any run with one line (exit status 2).

Why copies and not `dvc exp run --queue -S seed=N` + `dvc queue start -j N` + `dvc exp show --json`, which would
leave each seed as an experiment to `dvc exp apply`: a queued experiment runs in a temporary workspace that DVC
builds from git, without the ignored download cache (each seed would download and extract it again, or copy it
with `-C`); its stages log into the project's own MLflow store and registry (DVC points DVC_ROOT at the project),
so every seed would register models and move the `challenger` alias; and a failed experiment's error is only in
`dvc queue logs`, behind the Celery workers' state. Copies share the cache, touch nothing of the project, and keep
each seed's output at hand; `--workdir` keeps them (each a complete DVC project with its lock, outs, log and MLflow
store) for inspection.

Examples:
    python benchmarks/seeds.py --seeds 0 1 2 --targets evaluate rl --jobs 2 --markdown seeds.md
    python benchmarks/seeds.py --seeds 0 1 2 --targets evaluate -S pretrain.epochs=300 --metric 'evaluate.json:*.top1'
    python benchmarks/seeds.py --seeds 0 1 --targets text_task_evaluate --metric 'text/task.json:*.accuracy'
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline_lib.core.config import apply_overrides

# Headline keys per metrics file (relative to metrics/): what a reader of the README compares across seeds.
HEADLINES: dict[str, tuple[str, ...]] = {
    "evaluate.json": ("ssl.top1", "scratch.top1", "gain.top1", "baselines.*.top1", "encoder.*_top1"),
    "rl.json": ("reference.reward_greedy", "post_trained.reward_greedy", "post_trained.accuracy",
                "baselines.*.reward_greedy"),
    "text/ngram.json": ("bpc",),
    "text/evaluate.json": ("*.bpc", "*.bpc_bound", "gain.*"),
    "text/task.json": ("*.accuracy", "gain.*"),
}
# Keys of any other file that are bookkeeping, not results: left out of its default metrics.
NOT_RESULTS = ("*seconds", "*_per_second", "steps", "resumed_from_step", "*params")
DATA_CACHE = Path("data/cache")
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
EXIT_FAILED, EXIT_BAD_INPUT = 1, 2


class BadInput(ValueError):
    """An option the benchmark refuses before any run; the message is its one line."""


@dataclass
class Plan:
    """What every seed runs: the project, its targets, the stages they reproduce and their metrics files."""

    root: Path
    targets: list[str]
    overrides: list[str]
    target_files: list[str]  # metrics files (relative to metrics/) of the targets themselves
    run_files: list[str]  # metrics files of every stage the targets reproduce
    outs: list[Path]  # every path DVC writes in the project (left out of the copies)
    inputs: list[Path]  # deps no stage writes (copied into each copy when git does not carry them)


@dataclass
class SeedResult:
    """One seed's outcome: its metrics (flat `file:key` -> value) or the error line of the stage that failed."""

    seed: int
    seconds: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None


# ------------------------------------------------------------------------------------------------ input checks


def plan(root: Path, targets: Sequence[str], overrides: Sequence[str], seeds: Sequence[int]) -> Plan:
    """Check the targets, the overrides and the seeds against the project at `root`; what the runs need.

    Raises:
        BadInput: an unknown target, a `-S` key that params.yaml does not have, a value the params refuse, a seed
            given twice.
    """
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    if len(set(seeds)) != len(seeds):
        raise BadInput(f"--seeds {' '.join(map(str, seeds))}: each seed once")
    check_overrides(root / "params.yaml", overrides, seeds)
    with working_directory(root), Repo(str(root)) as repo:  # DVC resolves targets against the working directory
        run_stages, target_files = {}, []
        for target in targets:
            try:
                own = repo.stage.collect(target)
                upstream = repo.stage.collect(target, with_deps=True)
            except DvcException as err:
                names = ", ".join(sorted(stage.addressing for stage in repo.index.stages))
                raise BadInput(f"--targets {target}: {err} (stages: {names})") from err
            target_files += [metrics_name(root, out) for stage in own for out in stage.outs if out.metric]
            run_stages.update({stage.addressing: stage for stage in upstream})
        run_files = [metrics_name(root, out) for stage in run_stages.values() for out in stage.outs if out.metric]
        outs = [Path(out.fs_path) for stage in repo.index.stages for out in stage.outs]
        inputs = [Path(dep.fs_path) for stage in run_stages.values() for dep in stage.deps
                  if getattr(dep, "fs_path", None) and _under(Path(dep.fs_path), root)
                  and not any(_under(Path(dep.fs_path), out) for out in outs)]
    return Plan(root, list(targets), list(overrides), sorted(set(target_files)), sorted(set(run_files)), outs,
                sorted(set(inputs)))


@contextmanager
def working_directory(folder: Path) -> Iterator[None]:
    previous = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


def check_overrides(params_file: Path, overrides: Sequence[str], seeds: Sequence[int]) -> None:
    """Each `-S key=value` names a key params.yaml has, and the params accept every value and seed."""
    from pipeline_lib.core.errors import ConfigError
    from pipeline_lib.params import load_params

    document = yaml.safe_load(params_file.read_text()) or {}
    for assignment in overrides:
        key, equals, _ = assignment.partition("=")
        if not equals or not key:
            raise BadInput(f"-S {assignment}: expected KEY=VALUE, e.g. -S pretrain.epochs=300")
        if key == "seed":
            raise BadInput(f"-S {assignment}: the seeds come from --seeds")
        node: Any = document
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise BadInput(f"-S {assignment}: params.yaml has no key {key!r}")
            node = node[part]
    for seed in seeds:
        try:
            load_params(params_file, [*overrides, f"seed={seed}"])
        except ConfigError as err:
            raise BadInput(f"params.yaml with -S {' -S '.join([*overrides, f'seed={seed}'])}: {err}") from err


def metrics_name(root: Path, out: Any) -> str:
    """A metrics out as its name relative to metrics/ (or to the project root when it lies elsewhere)."""
    path = Path(out.fs_path).relative_to(root)
    return path.relative_to("metrics").as_posix() if path.parts[0] == "metrics" else path.as_posix()


def check_metrics(patterns: Sequence[str], plan: Plan) -> None:
    """Each `--metric` glob matches a metric of the stages the targets run, as the project's current metrics files
    show them (a file not written yet is only matched by name).

    Raises:
        BadInput: naming the glob and the files it could match.
    """
    for pattern in patterns:
        file_glob, colon, _ = pattern.partition(":")
        if not colon:
            raise BadInput(f"--metric {pattern!r}: expected FILE:KEY globs, e.g. 'evaluate.json:ssl.top1'")
        files = [name for name in plan.run_files if fnmatch.fnmatchcase(name, file_glob)]
        if not files:
            raise BadInput(f"--metric {pattern!r}: no metrics file of the targets' stages matches {file_glob!r} "
                           f"(files: {', '.join(plan.run_files) or 'none'})")
        known = [read_metrics(plan.root / "metrics" / name, name) for name in files
                 if (plan.root / "metrics" / name).is_file()]
        if len(known) == len(files) and not any(fnmatch.fnmatchcase(key, pattern) for keys in known for key in keys):
            sample = ", ".join(sorted(key for keys in known for key in keys)[:8])
            raise BadInput(f"--metric {pattern!r}: matches no metric of {', '.join(files)} (e.g. {sample})")


# ---------------------------------------------------------------------------------------------------- metrics


def flatten(document: Any, prefix: str = "") -> Iterator[tuple[str, float]]:
    """Numbers of a JSON document as (dotted key, value); booleans, strings and nulls left out."""
    if isinstance(document, dict):
        for key, value in document.items():
            yield from flatten(value, f"{prefix}{key}.")
    elif isinstance(document, (int, float)) and not isinstance(document, bool):
        yield prefix.rstrip("."), float(document)


def read_metrics(path: Path, name: str) -> dict[str, float]:
    """A metrics file as `name:dotted.key` -> value."""
    return {f"{name}:{key}": value for key, value in flatten(json.loads(path.read_text()))}


def collected_metrics(copy: Path) -> dict[str, float]:
    """Every metric a copy's run wrote under metrics/."""
    found: dict[str, float] = {}
    for path in sorted((copy / "metrics").rglob("*.json")):
        found.update(read_metrics(path, path.relative_to(copy / "metrics").as_posix()))
    return found


def default_patterns(target_files: Sequence[str]) -> list[str]:
    """The headline globs of the targets' own metrics files."""
    patterns = []
    for name in target_files:
        patterns += [f"{name}:{key}" for key in HEADLINES.get(name, ("*",))]
    return patterns


def selected(keys: Sequence[str], patterns: Sequence[str], *, defaults: bool) -> list[str]:
    """The keys any pattern matches, in the order of the patterns; defaults leave out bookkeeping keys of files
    without headlines."""
    chosen: list[str] = []
    for pattern in patterns:
        for key in keys:
            name, _, dotted = key.partition(":")
            bookkeeping = defaults and name not in HEADLINES and any(
                fnmatch.fnmatchcase(dotted.rsplit(".", 1)[-1], skip) for skip in NOT_RESULTS)
            if fnmatch.fnmatchcase(key, pattern) and not bookkeeping and key not in chosen:
                chosen.append(key)
    return chosen


def statistics(values: Sequence[float]) -> dict[str, float]:
    """Count, mean, sample std (nan for one value), min and max."""
    count = len(values)
    mean = sum(values) / count if count else math.nan
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (count - 1)) if count > 1 else math.nan
    return {"n": count, "mean": mean, "std": std, "min": min(values, default=math.nan),
            "max": max(values, default=math.nan)}


def summary_rows(results: Sequence[SeedResult], keys: Sequence[str]) -> list[dict[str, Any]]:
    """One row per metric: its statistics over the seeds that have it, then each seed's value (None: none)."""
    rows = []
    for key in keys:
        values = {result.seed: result.metrics.get(key) for result in results}
        stats = statistics([value for value in values.values() if value is not None])
        rows.append({"metric": key, **stats, **{f"seed_{seed}": value for seed, value in values.items()}})
    return rows


# ------------------------------------------------------------------------------------------------------- runs


def project_files(root: Path) -> list[Path]:
    """The working tree as git sees it: tracked files that exist and untracked files it does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                            capture_output=True, text=True, check=True).stdout
    return [Path(name) for name in sorted(set(listed.split("\0"))) if name and (root / name).is_file()]


def _under(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def make_copy(plan: Plan, seed: int, copy: Path) -> None:
    """The project at `copy`, committed, with `seed` and the overrides in params.yaml (see the module docstring)."""
    root = plan.root
    for name in project_files(root):
        if name.name == "dvc.lock" or any(_under(root / name, out) for out in plan.outs):
            continue  # results of the project's last run, which the seed's run writes again
        target = copy / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, target)
    for source in plan.inputs:  # deps git does not carry (data/raw)
        relative = source.relative_to(root)
        if source.is_dir():
            for path in source.rglob("*"):
                if path.is_file() and not (copy / relative / path.relative_to(source)).exists():
                    _link_or_copy(path, copy / relative / path.relative_to(source))
        elif source.is_file() and not (copy / relative).exists():
            _link_or_copy(source, copy / relative)
    (root / DATA_CACHE).mkdir(parents=True, exist_ok=True)
    (copy / DATA_CACHE).parent.mkdir(parents=True, exist_ok=True)
    (copy / DATA_CACHE).symlink_to((root / DATA_CACHE).resolve(), target_is_directory=True)
    params = yaml.safe_load((copy / "params.yaml").read_text())
    apply_overrides(params, [*plan.overrides, f"seed={seed}"])
    (copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    identity = ["-c", "user.name=seeds benchmark", "-c", "user.email=seeds@localhost"]
    commit = ["git", *identity, "commit", "-q", "-m", f"seed {seed}"]
    for command in (["git", "init", "-q"], ["git", "add", "-A"], commit):
        subprocess.run(command, cwd=copy, check=True, capture_output=True)


def run_env(threads: int) -> dict[str, str]:
    """The environment of a copy's `dvc repro`: its thread share, its own MLflow store, no DVC analytics."""
    env = {name: value for name, value in os.environ.items()
           if name not in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME", "DVC_STAGE")}
    env.update({name: str(threads) for name in THREAD_VARIABLES})
    env["DVC_NO_ANALYTICS"] = "1"
    return env


def error_line(output: str) -> str:
    """The line that says why a `dvc repro` failed: the failing stage's one-line error (`<stage>: <message>`), else
    the last exception line before DVC's own error, else DVC's error."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    failed = next((i for i in range(len(lines) - 1, -1, -1) if lines[i].startswith("ERROR:")), None)
    if failed is None:
        return lines[-1] if lines else "dvc repro failed without output"
    match = re.search(r"failed to reproduce '(?:[^']*:)?([^'@]+)", lines[failed])
    before = lines[:failed]
    if match:
        stage = match.group(1)
        own = [line for line in before if line.startswith(f"{stage}:") or line.startswith(f"{stage}@")]
        if own:
            return f"{stage}: {own[-1].split(':', 1)[1].strip()}"
    exceptions = [line for line in before if re.match(r"^[\w.]*(Error|Exception)\b", line)]
    return exceptions[-1] if exceptions else lines[failed].removeprefix("ERROR:").strip()


def run_seed(plan: Plan, seed: int, copy: Path, threads: int) -> SeedResult:
    """Copy the project, reproduce the targets, read the metrics (or the error line)."""
    started = time.perf_counter()
    make_copy(plan, seed, copy)
    with open(copy / "repro.log", "w") as log:
        done = subprocess.run([sys.executable, "-m", "dvc", "repro", *plan.targets], cwd=copy, env=run_env(threads),
                              stdout=log, stderr=subprocess.STDOUT, text=True)
    result = SeedResult(seed, seconds=time.perf_counter() - started)
    if done.returncode != 0:
        result.error = error_line((copy / "repro.log").read_text(errors="replace"))
    else:
        result.metrics = collected_metrics(copy)
    return result


def run_all(plan: Plan, seeds: Sequence[int], workdir: Path, jobs: int) -> list[SeedResult]:
    """Every seed, `jobs` at a time, each with its share of the cores; progress on stdout as seeds finish."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, cores // jobs)
    print(f"seeds {' '.join(map(str, seeds))}: dvc repro {' '.join(plan.targets)} in copies of {plan.root}, "
          f"{jobs} at a time with {threads} thread(s) each; overrides: {' '.join(plan.overrides) or 'none'}",
          flush=True)

    def one(seed: int) -> SeedResult:
        result = run_seed(plan, seed, workdir / f"seed-{seed}", threads)
        status = f"failed: {result.error}" if result.error else f"{len(result.metrics)} metrics"
        print(f"seed {seed}: {result.seconds:.0f} s, {status}", flush=True)
        return result

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(one, seeds))


# ----------------------------------------------------------------------------------------------------- report


def _number(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def table_text(rows: Sequence[dict[str, Any]], seeds: Sequence[int]) -> str:
    """The summary as an aligned text table."""
    width = max([len("metric"), *(len(row["metric"]) for row in rows)])
    header = f"{'metric':<{width}} {'mean':>8} {'std':>8} {'min':>8} {'max':>8} {'n':>3}" + "".join(
        f" {'seed ' + str(seed):>8}" for seed in seeds)
    lines = [header]
    for row in rows:
        cells = [_number(row[name]) for name in ("mean", "std", "min", "max")]
        lines.append(f"{row['metric']:<{width}} " + " ".join(f"{cell:>8}" for cell in cells) + f" {row['n']:>3}"
                     + "".join(f" {_number(row[f'seed_{seed}']):>8}" for seed in seeds))
    return "\n".join(lines)


def table_markdown(rows: Sequence[dict[str, Any]], seeds: Sequence[int], results: Sequence[SeedResult],
                   plan: Plan) -> str:
    """The summary as Markdown: one line of context, the table, and any failed seed."""
    lines = [f"Seeds {', '.join(map(str, seeds))}: `dvc repro {' '.join(plan.targets)}`"
             + (f" with `-S {' -S '.join(plan.overrides)}`" if plan.overrides else "")
             + "; mean and sample std over the seeds that finished.", "",
             "| metric | mean ± std | min | max | " + " | ".join(f"seed {seed}" for seed in seeds) + " |",
             "|---|---|---|---|" + "---|" * len(seeds)]
    for row in rows:
        lines.append(f"| `{row['metric']}` | {_number(row['mean'])} ± {_number(row['std'])} | {_number(row['min'])} "
                     f"| {_number(row['max'])} | " + " | ".join(_number(row[f"seed_{seed}"]) for seed in seeds) + " |")
    lines += [f"\nSeed {result.seed} failed: {result.error}" for result in results if result.error]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: Sequence[dict[str, Any]], seeds: Sequence[int]) -> None:
    columns = ["metric", "n", "mean", "std", "min", "max", *(f"seed_{seed}" for seed in seeds)]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", required=True, help="values of the top-level seed")
    parser.add_argument("--targets", nargs="+", required=True, help="what each seed reproduces (dvc repro TARGETS)")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a params.yaml value for every seed, as `dvc exp run -S` sets it; repeat")
    parser.add_argument("--metric", action="append", default=[], metavar="FILE:KEY",
                        help="globs over `file:dotted.key` (file relative to metrics/); repeat. Default: the "
                             "targets' headline metrics")
    parser.add_argument("--jobs", type=int, default=1, help="seeds run at a time (default: %(default)s)")
    parser.add_argument("--project", type=Path, default=Path(), help="the project folder (default: here)")
    parser.add_argument("--workdir", type=Path, help="keep each seed's copy here (default: a temporary folder, "
                                                     "removed at the end)")
    parser.add_argument("--out", type=Path, help="write the summary as CSV")
    parser.add_argument("--markdown", type=Path, help="write the summary as Markdown (e.g. for a CI job summary)")
    args = parser.parse_args(argv)
    root = args.project.resolve()
    try:
        if not (root / "dvc.yaml").is_file() or not (root / "params.yaml").is_file():
            raise BadInput(f"--project {args.project}: no dvc.yaml and params.yaml there")
        if args.jobs < 1:
            raise BadInput(f"--jobs {args.jobs}: must be a positive integer")
        if args.workdir is not None and args.workdir.exists() and any(args.workdir.iterdir()):
            raise BadInput(f"--workdir {args.workdir}: must be empty or absent (it receives one copy per seed)")
        benchmark = plan(root, args.targets, args.overrides, args.seeds)
        check_metrics(args.metric, benchmark)
    except BadInput as err:
        print(f"seeds: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    keep = args.workdir is not None
    workdir = args.workdir.resolve() if keep else Path(tempfile.mkdtemp(prefix="seeds-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        results = run_all(benchmark, args.seeds, workdir, args.jobs)
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    keys = sorted({key for result in results for key in result.metrics})
    patterns = args.metric or default_patterns(benchmark.target_files)
    rows = summary_rows(results, selected(keys, patterns, defaults=not args.metric))
    print(table_text(rows, args.seeds))
    for result in results:
        if result.error:
            print(f"seed {result.seed} failed: {result.error}")
    if args.out:
        write_csv(args.out, rows, args.seeds)
    if args.markdown:
        args.markdown.write_text(table_markdown(rows, args.seeds, results, benchmark))
    return EXIT_FAILED if any(result.error for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
