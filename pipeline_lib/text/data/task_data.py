"""The task data of the text track: `train`, `rl` and `test` splits of a verifiable task, written once by the
`text_task` stage and read by finetuning, GRPO and evaluation.

The folder holds `train.jsonl`, `rl.jsonl`, `test.jsonl` (one ``{"prompt": ..., "answer": ...}`` per line) and
`meta.json`: the task kind (or ``jsonl``), the checker that decides right answers, the split sizes and each
file's sha256. Generated splits never share a prompt (`tasks.make_splits`); JSONL splits are checked for it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline_lib.core.errors import ConfigError
from pipeline_lib.core.outputs import staged_dir
from pipeline_lib.core.tracking import Tracker, write_run_record
from pipeline_lib.text.config import TextParams, TextTaskParams
from pipeline_lib.text.data.checkers import CHECKERS, DEFAULT_CHECKER, Checker
from pipeline_lib.text.data.tasks import TASKS, Example, load_jsonl, make_splits, prompts_available, write_jsonl

SPLITS = ("train", "rl", "test")
META_FILE = "meta.json"


@dataclass(frozen=True)
class TaskData:
    """The three splits and how their answers are checked."""

    splits: dict[str, list[Example]]
    checker_name: str
    meta: dict[str, Any]

    @property
    def checker(self) -> Checker:
        return CHECKERS[self.checker_name]


def _options(cfg: TextTaskParams) -> dict[str, int]:
    """The generator options of the task's kind, from their keys."""
    return {name: getattr(cfg, name) for name in TASKS[cfg.kind].defaults}


def _option_keys(cfg: TextTaskParams) -> str:
    return ", ".join(f"text_task.{name}" for name in TASKS[cfg.kind].defaults)


def split_file(cfg: TextTaskParams, name: str) -> Path:
    """The JSONL file `text_task.<name>_path` names; a ConfigError if there is none."""
    path = Path(getattr(cfg, f"{name}_path"))
    if not path.is_file():
        raise ConfigError(f"text_task.{name}_path={str(path)!r}: no such file")
    return path


def check_inputs(params: TextParams) -> None:
    """What the text_task stage checks before its MLflow run: the JSONL files exist, or the generated kind has
    as many distinct prompts as the three splits ask for (`tasks.prompts_available`).

    Raises:
        ConfigError: naming the key.
    """
    cfg = params.text_task
    if cfg.source == "jsonl":
        for name in SPLITS:
            split_file(cfg, name)
        return
    total = cfg.train_size + cfg.rl_size + cfg.test_size
    try:
        available = prompts_available(cfg.kind, total, **_options(cfg))
    except ValueError as err:  # an option out of range for the kind
        raise ConfigError(f"text_task.kind={cfg.kind!r}: {err} (keys {_option_keys(cfg)})") from err
    if available is not None:
        raise ConfigError(
            f"text_task.train_size={cfg.train_size}: with text_task.rl_size={cfg.rl_size} and "
            f"text_task.test_size={cfg.test_size} the splits ask for {total} distinct prompts, but {cfg.kind} with "
            f"{_options(cfg)} has only {available} (accepted: sizes adding up to at most {available}; or raise "
            f"{_option_keys(cfg)})"
        )


def build_splits(cfg: TextTaskParams, seed: int) -> dict[str, list[Example]]:
    """Draw or read the splits; every error names the params key or the file and line."""
    if cfg.source == "generate":
        try:
            return make_splits(cfg.kind, {"train": cfg.train_size, "rl": cfg.rl_size, "test": cfg.test_size},
                               seed, **_options(cfg))
        except ValueError as err:
            raise ValueError(f"text_task (kind {cfg.kind}; {_option_keys(cfg)}, *_size): {err}") from err
    splits = {name: load_jsonl(split_file(cfg, name)) for name in SPLITS}
    seen: dict[str, str] = {}
    for name, examples in splits.items():
        for example in examples:
            if seen.setdefault(example.prompt, name) != name:
                raise ValueError(f"text_task.{name}_path: prompt {example.prompt!r} is also in the "
                                 f"{seen[example.prompt]} split; splits must not share a prompt")
    return splits


def checker_name(cfg: TextTaskParams) -> str:
    """The declared checker, or the generated kind's own for `auto`."""
    return DEFAULT_CHECKER[cfg.kind] if cfg.checker == "auto" else cfg.checker


def prepare_task(params: TextParams, out: Path) -> dict[str, Any]:
    """Write the task folder (staged, renamed into place) and return its meta."""
    cfg = params.text_task
    splits = build_splits(cfg, params.seed)
    with staged_dir(out) as folder:
        for name, examples in splits.items():
            write_jsonl(folder / f"{name}.jsonl", examples)
        meta = {"source": cfg.source, "kind": cfg.kind if cfg.source == "generate" else "jsonl",
                "checker": checker_name(cfg), "sizes": {name: len(examples) for name, examples in splits.items()},
                "sha256": {f"{name}.jsonl": hashlib.sha256((folder / f"{name}.jsonl").read_bytes()).hexdigest()
                           for name in splits},
                "examples": {name: [examples[0].prompt, examples[0].answer] for name, examples in splits.items()}}
        if cfg.source == "generate":
            meta["options"] = _options(cfg)
        (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def read_task(folder: Path) -> TaskData:
    """The splits and checker the `text_task` stage wrote to `folder`."""
    folder = Path(folder)
    if not (folder / META_FILE).is_file():
        raise FileNotFoundError(f"{folder}: no {META_FILE}; run the text_task stage first (dvc repro text_task)")
    meta = json.loads((folder / META_FILE).read_text())
    return TaskData({name: load_jsonl(folder / f"{name}.jsonl") for name in SPLITS}, meta["checker"], meta)


def task_digest(folder: Path) -> str:
    """sha256 over the three split files, the task data's identity in lineage tags and fingerprints."""
    meta = json.loads((Path(folder) / META_FILE).read_text())
    return hashlib.sha256(json.dumps(meta["sha256"], sort_keys=True).encode()).hexdigest()


def copy_task_meta(folder: Path, out: Path) -> None:
    """Copy the task's meta into a model folder, so the model says what it was trained on."""
    shutil.copy(Path(folder) / META_FILE, Path(out) / "task.json")


def run_text_task(params: TextParams, tracker: Tracker, out: Path) -> dict[str, Any]:
    """The text_task stage: write the task's splits into `out`, log their sizes and digests, and point `run.json`
    at the run."""
    meta = prepare_task(params, out)
    tracker.log_metrics({f"{split}.examples": n for split, n in meta["sizes"].items()})
    tracker.set_tags({"task.kind": meta["kind"], "task.checker": meta["checker"],
                      **{f"input.{name}.sha256": digest for name, digest in meta["sha256"].items()}})
    tracker.log_artifact(out / META_FILE)
    write_run_record(out / "run.json", tracker)
    return meta
