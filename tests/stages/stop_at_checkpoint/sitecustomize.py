"""For the kill drills: stop a training process at a checkpoint the test names, so that the kill lands at a
known point instead of wherever a watcher happened to catch the run.

A test puts this folder first on `PYTHONPATH` and sets `STOP_AT_CHECKPOINT` to a JSON object
`{"paths": [...], "step": N, "record": FILE}`. Every trainer writes `<checkpoints>/last.pt` atomically: a temporary
file, then a rename over `last.pt`. The Python process that is about to rename its next checkpoint over a `last.pt`
of step N, at one of `paths` (relative to its working directory), writes `{"path", "step": N, "next_step", "pid"}`
to FILE and stops itself (SIGSTOP) before the rename: `last.pt` holds step N, the steps up to the next checkpoint
were trained and logged, and that checkpoint lies half-saved beside `last.pt`, as after a kill -9 in the middle of
a save. The test, which waits for FILE, then kills the process group with SIGKILL (a test run that is itself
killed first leaves the stopped process behind: FILE names its pid). Nothing else changes: without
`STOP_AT_CHECKPOINT` this module only hands over to any other `sitecustomize` on the path.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import signal
import sys


def _install() -> None:
    spec = os.environ.get("STOP_AT_CHECKPOINT")
    if not spec:
        return
    config = json.loads(spec)
    targets = [os.path.normpath(path) for path in config["paths"]]
    stop_after, record = int(config["step"]), config["record"]

    def hook(event: str, args: tuple) -> None:
        if event != "os.rename" or not isinstance(args[1], (str, os.PathLike)):
            return
        destination = os.path.normpath(os.fspath(args[1]))
        matched = next((t for t in targets if destination == t or destination.endswith(os.sep + t)), None)
        if matched is None or not os.path.isfile(destination):
            return
        import torch  # the trainer's process has it loaded already

        def step(path: str | os.PathLike) -> int:
            return int(torch.load(os.fspath(path), map_location="cpu", weights_only=True, mmap=True)["step"])

        if step(destination) != stop_after:
            return
        partial = f"{record}.tmp"
        with open(partial, "w") as handle:
            json.dump({"path": matched, "step": stop_after, "next_step": step(args[0]), "pid": os.getpid()}, handle)
        os.replace(partial, record)  # not a target: the hook ignores its own rename
        os.kill(os.getpid(), signal.SIGSTOP)

    sys.addaudithook(hook)


def _hand_over() -> None:
    """Run the `sitecustomize` this one shadows, if any (as Python would have without this folder)."""
    here = os.path.dirname(os.path.abspath(__file__))
    path = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is not None and spec.loader is not None:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


_install()
_hand_over()
