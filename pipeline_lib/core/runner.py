"""The stage runner: what every DVC stage does around its library entry point, written once.

A stage script parses its paths and declares a `Stage`: its name, how its params load, what its inputs decide
(`check`), what it logs and where its inputs came from, and its entry point. `run_stage` then does the rest, in
this order:

1. load and validate the params file (every params error surfaces here, before any work);
2. for a stage on a device: resolve `params.device` and join torchrun's process group when launched by it;
3. `check`: the params that the inputs decide, before any work and any MLflow run;
4. on rank 0, open the stage's MLflow run (`tracking.stage_run`) with its lineage: params, input digests, the
   upstream stages' run ids, and the run of an interrupted execution read from the checkpoint folder, which is
   reopened; other ranks get a plain `Tracker` that records nothing;
5. call the entry point, leave the process group, and print one summary line on rank 0.

Bad input (`ONE_LINE_ERRORS`) stops the stage with one line, `<stage name>: <message>`, and exit status 1.

A training stage reads like `stages/pretrain.py`; a data stage like `stages/fetch.py`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pipeline_lib.core.config import CoreParams
from pipeline_lib.core.errors import ConfigError, DataError, NonFiniteLossError
from pipeline_lib.core.tracking import Tracker, TrackingUnavailable, read_run_record, stage_run, upstream_runs

if TYPE_CHECKING:
    import torch

P = TypeVar("P", bound=CoreParams)

# Bad input, reported in one line: params (ConfigError), data (DataError), a diverged loss (NonFiniteLossError), the
# tracking server, a missing input file, a value the inputs refuse.
ONE_LINE_ERRORS: tuple[type[Exception], ...] = (ConfigError, DataError, NonFiniteLossError, TrackingUnavailable,
                                                FileNotFoundError, ValueError)


@contextmanager
def one_line_errors(stage: str) -> Iterator[None]:
    """Turn bad input raised in the body into the one-line error `<stage>: <message>` and exit status 1."""
    try:
        yield
    except ONE_LINE_ERRORS as err:
        sys.exit(f"{stage}: {err}")


def summary_line(summary: Mapping[str, Any]) -> str:
    """The default summary line: `key value` for each entry, 4 significant digits."""
    return ", ".join(f"{key} {value:.4g}" for key, value in summary.items())


def _nothing(params: Any) -> None:
    """The default check: params alone decide everything."""


def _no_inputs(params: Any) -> dict[str, str]:
    """The default inputs: none with a digest."""
    return {}


@dataclass(frozen=True)
class Stage(Generic[P]):
    """What one stage declares; `run_stage` does the rest.

    Attributes:
        name: the DVC stage name; also the MLflow run name and the prefix of its one-line errors.
        load: reads and validates the params file (e.g. `pipeline_lib.params.load_params`).
        run: the entry point, `run(params, tracker, device) -> summary`; `device` is None unless `device` is set.
        logged: the flat dotted params the stage uses, as MLflow logs and hashes them.
        check: raises on params that the inputs decide (e.g. a batch larger than the split); runs before any
            work and any MLflow run.
        inputs: params -> (name -> sha256 of each input: data, upstream model), read after `check`.
        upstream: stage -> the folder that stage wrote (with its `run.json`), or a function of the params giving
            that mapping (where the params decide which inputs a stage reads); a None folder (an optional input
            left out) is skipped.
        tags: further lineage tags, read after `check` (e.g. the registered model version a stage starts from).
        device: resolve `params.device` for the entry point and, under torchrun, join the process group (only
            rank 0 then opens the MLflow run, prints and writes).
        checkpoints: the folder holding the trainer's checkpoint (`trainer.CHECKPOINT_NAME`); a rerun of a killed
            execution reopens that checkpoint's MLflow run. Needs `fingerprint`.
        fingerprint: identifies the training run a checkpoint must belong to (`read_checkpoint`).
        report: the summary line printed after `<name>: `.
    """

    name: str
    load: Callable[[Path], P]
    run: Callable[[P, Tracker, torch.device | None], Any]
    logged: Callable[[P], Mapping[str, Any]]
    check: Callable[[P], object] = _nothing
    inputs: Callable[[P], Mapping[str, str]] = _no_inputs
    upstream: Mapping[str, Path | None] | Callable[[P], Mapping[str, Path | None]] = field(default_factory=dict)
    tags: Callable[[], Mapping[str, str]] = dict
    device: bool = False
    checkpoints: Path | None = None
    fingerprint: Callable[[P], str] | None = None
    report: Callable[[Any], str] = summary_line

    def __post_init__(self) -> None:
        if (self.checkpoints is None) != (self.fingerprint is None):
            raise TypeError(f"Stage {self.name!r}: checkpoints and fingerprint go together (resuming needs "
                            "the folder and the run's fingerprint)")


def run_stage(stage: Stage[P], params_file: Path) -> Any:
    """Run `stage` with the params in `params_file` (see the module docstring); returns the entry's summary.

    Raises:
        SystemExit: `<stage name>: <message>` on bad input (`ONE_LINE_ERRORS`), before any MLflow run when the
            params or `stage.check` refuse it.
    """
    main = True
    with one_line_errors(stage.name):
        try:
            params = stage.load(params_file)  # every params error surfaces here, before any work
            device = _join_devices(params.device) if stage.device else None
            main = not stage.device or _is_main()
            stage.check(params)  # what the inputs decide: before any work and any MLflow run
            with _tracking(stage, params) if main else nullcontext(Tracker()) as tracker:
                summary = stage.run(params, tracker, device)
        finally:
            if stage.device:
                _leave_devices()
    if main:
        print(f"{stage.name}: {stage.report(summary)}")
    return summary


def _tracking(stage: Stage[P], params: P) -> Any:
    """The stage's MLflow run (rank 0), resuming the run of an interrupted execution."""
    resume = None
    if stage.checkpoints is not None and stage.fingerprint is not None:
        resume = previous_run_id(stage.checkpoints, stage.fingerprint(params))
    upstream = stage.upstream(params) if callable(stage.upstream) else stage.upstream
    return stage_run(stage.name, params, stage.logged(params), inputs=stage.inputs(params),
                     upstream=upstream_runs(upstream), resume_run_id=resume, extra_tags=stage.tags())


def previous_run_id(checkpoints: Path, fingerprint: str) -> str | None:
    """The MLflow run id stored in the checkpoint in `checkpoints`, if one matches `fingerprint`."""
    from pipeline_lib.core.checkpoints import CHECKPOINT_NAME, read_checkpoint

    previous = read_checkpoint(Path(checkpoints) / CHECKPOINT_NAME, fingerprint)
    return previous.get("run_id") if previous else None


def model_version_tags(prefix: str, folder: Path | None) -> dict[str, str]:
    """`<prefix>.model_name` and `<prefix>.model_version`: the registered model a stage starts from, from the
    `run.json` in `folder` ("None" when it registered none, or when there is no folder)."""
    record = read_run_record(folder) if folder is not None else {}
    return {f"{prefix}.model_name": str(record.get("model_name")),
            f"{prefix}.model_version": str(record.get("model_version"))}


def stage_parser(doc: str, *paths: str) -> argparse.ArgumentParser:
    """The stage's argument parser: its docstring's first line, `--params`, and one required `--<path>` each."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    for name in paths:
        parser.add_argument(f"--{name}", type=Path, required=True)
    return parser


def named_folders(items: list[str], option: str) -> dict[str, Path]:
    """`NAME=FOLDER` arguments as name -> folder; a ValueError (a one-line error) unless each has both."""
    folders = {name: Path(folder) for name, _, folder in (item.partition("=") for item in items)}
    if not folders or not all(folders) or Path() in folders.values():
        raise ValueError(f"{option} {items}: give one or more NAME=FOLDER")
    return folders


# torch loads only for a stage on a device: the data stages start in a fraction of the time without it.
def _join_devices(preference: str) -> torch.device:
    from pipeline_lib.core import dist

    device = dist.resolve_device(preference)
    dist.init_distributed(device)
    return device


def _is_main() -> bool:
    from pipeline_lib.core import dist

    return dist.is_main()


def _leave_devices() -> None:
    from pipeline_lib.core import dist

    dist.cleanup()
