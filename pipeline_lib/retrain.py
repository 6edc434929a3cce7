"""Retrain: what the retrain workflow runs, as one command on a laptop.

Usage: python -m pipeline_lib.retrain [--base REV] [-S key=value ...] [--no-promote] [--summary FILE]
           [--report FILE]

Steps, each stopping the command when it fails:
  1. check the params with the overrides and the tracking store, before any training;
  2. `dvc exp run [-S key=value ...]`: reruns exactly the stages whose deps or params changed (the overrides
     are written to params.yaml, as `dvc exp run -S` does, and every MLflow run is tagged with the experiment);
  3. `dvc params diff` and `dvc metrics diff` against `--base` (default HEAD: the committed params and metrics);
  4. the promotion gates (`python -m pipeline_lib.promote`: every gate the promote section declares), unless
     `--no-promote` (the workflow promotes in a separate job).
The report (diffs, gate decision, wall times) is printed, written to `--report` and appended to `--summary`.

Exit status: 0 done, 1 the pipeline or a diff failed, 2 bad input (params, overrides, gate input), 3 the
tracking store is unreachable.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from pipeline_lib.core.errors import ConfigError
from pipeline_lib.core.registry import PromotionError
from pipeline_lib.core.tracking import TrackingUnavailable, check_tracking_store, project_root, tracking_uri
from pipeline_lib.params import load_params
from pipeline_lib.promote import EXIT_BAD_INPUT, EXIT_UNREACHABLE, append_text, decision_markdown, run_gates

EXIT_DONE, EXIT_FAILED = 0, 1


class StepFailed(RuntimeError):
    """A DVC command of the retrain failed; the message holds the command and its output."""


def dvc(*args: str, capture: bool = False) -> str:
    """Run `dvc <args>` with this interpreter; its output goes to the console unless captured."""
    command = [sys.executable, "-m", "dvc", *args]
    done = subprocess.run(command, capture_output=capture, text=True)
    if done.returncode != 0:
        output = (done.stdout or "") + (done.stderr or "") if capture else "(output above)"
        raise StepFailed(f"`dvc {' '.join(args)}` exited with status {done.returncode}: {output.strip()}")
    return done.stdout if capture else ""


def retrain(overrides: Sequence[str], base: str, *, gate: bool) -> str:
    """Steps 2-4 of the module docstring; returns the markdown report."""
    started = time.perf_counter()
    dvc("exp", "run", *[arg for override in overrides for arg in ("-S", override)])
    trained = time.perf_counter() - started
    params_diff = dvc("params", "diff", base, "--md", capture=True)
    metrics_diff = dvc("metrics", "diff", base, "--md", "--precision", "4", capture=True)
    sections = ["## Retrain", "",
                f"Overrides: {' '.join(f'`{o}`' for o in overrides) if overrides else 'none'}; "
                f"compared with `{base}`; pipeline {trained:.0f} s.", "",
                "### Params changed", "", _table_or(params_diff, "No params changed."), "",
                "### Metrics changed", "", _table_or(metrics_diff, "No metrics changed."), ""]
    if gate:
        decisions, errors = run_gates(load_params("params.yaml"))
        sections += [decision_markdown(decision) for decision in decisions]
        if errors:
            raise PromotionError("; ".join(errors))
    sections.append(f"Wall time {time.perf_counter() - started:.0f} s.")
    return "\n".join(sections) + "\n"


def _table_or(table: str, empty: str) -> str:
    """A markdown table from `dvc ... diff --md`, or `empty` when it has no rows (DVC prints the header)."""
    lines = table.strip().splitlines()
    return "\n".join(lines) if len(lines) > 2 else empty


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline_lib.retrain", description=__doc__.splitlines()[0],
                                     epilog="exit status: 0 done, 1 pipeline or diff failed, 2 bad input, "
                                            "3 tracking store unreachable")
    parser.add_argument("--base", default="HEAD", help="git revision to diff params and metrics against")
    parser.add_argument("-S", "--set-param", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a params key for this retrain, as `dvc exp run -S` does")
    parser.add_argument("--no-promote", dest="gate", action="store_false", help="skip the promotion gate")
    parser.add_argument("--summary", type=Path, help="append the report as markdown (e.g. $GITHUB_STEP_SUMMARY)")
    parser.add_argument("--report", type=Path, help="write the markdown report to this file")
    args = parser.parse_args(argv)
    summary, report_file = (path and path.resolve() for path in (args.summary, args.report))
    os.chdir(project_root())  # DVC and params.yaml are the project's, wherever the command starts
    try:
        load_params("params.yaml", args.overrides)  # a bad key or value stops here, before any training
        check_tracking_store(tracking_uri())
        report = retrain(args.overrides, args.base, gate=args.gate)
    except (ConfigError, PromotionError) as err:
        print(f"retrain: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TrackingUnavailable as err:
        print(f"retrain: {err}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except StepFailed as err:
        print(f"retrain: {err}", file=sys.stderr)
        return EXIT_FAILED
    print(report)
    append_text(summary, report)
    if report_file is not None:
        report_file.write_text(report)
    return EXIT_DONE


if __name__ == "__main__":
    sys.exit(main())
