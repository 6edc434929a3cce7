"""Shared pytest fixtures, the session's environment and how pytest-xdist spreads the tests over the cores."""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

# One thread per process, for this process (set before anything imports torch) and every command the tests start
# (they inherit it): pytest-xdist runs one worker per core, and PyTorch processes sharing the cores, each spinning
# on all of them, slow each other down many times over. Fixed-seed results do not depend on the thread count.
for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS"):
    os.environ[_name] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

MAX_WORKERS = 4  # `-n auto`: one worker per core, up to this many (beyond it the end-to-end modules set the pace)
# Units of work in the order pytest-xdist hands them out (`--dist loadgroup --no-loadscope-reorder`, pyproject.toml):
# a unit is a module (its module fixtures are built once), or a test on a copy of the toy project of its own
# (`toy_clone`). The long end-to-end units go first, so that no core is left alone with one at the end; the rest
# follows in file order.
RUN_FIRST = [
    "tests/stages/test_dvc_pipeline.py",  # reproduces the toy project (`toy_project`), then reads it
    "tests/stages/test_retrain.py",
    "tests/stages/test_kill_drills.py",  # compares with the toy project last: reproduced by then
    "toy_clone",  # each test that changes a copy of the toy project
    "tests/stages/test_pretrain_stage.py",
    "tests/stages/test_seeds_benchmark.py",  # reproduces two seeds of the toy project
    "tests/stages/test_label_curve.py",
    "tests/test_gpu_check.py",  # the GPU check's smoke run: fetch and pretrain in a copy of the project
    "tests/core/test_remote_tracking.py",
    "tests/stages/test_params_errors.py",
]


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: the cores this process may use, at most MAX_WORKERS."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, MAX_WORKERS))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Group the tests into units for `--dist loadgroup` (a test naming its own `xdist_group` keeps it) and put
    the units in RUN_FIRST first."""
    def unit(item: pytest.Item) -> tuple[str, str]:
        """(its place in RUN_FIRST, its group)"""
        if "toy_clone" in getattr(item, "fixturenames", ()):
            return "toy_clone", item.nodeid
        path = item.path.relative_to(config.rootpath).as_posix() if item.path.is_relative_to(config.rootpath) else (
            str(item.path))
        return path, path

    if getattr(config.option, "loadgroup", False):  # what pytest-xdist sets in its workers for `--dist loadgroup`
        for item in items:
            if item.get_closest_marker("xdist_group") is None:
                item.add_marker(pytest.mark.xdist_group(unit(item)[1]))
    rank = {name: index for index, name in enumerate(RUN_FIRST)}
    items.sort(key=lambda item: rank.get(unit(item)[0], len(rank)))  # stable: the rest keeps its order


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a module of tiny models (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    OpenMP's barriers cost more than their tiny matmuls (a hundredfold on a busy 2-core machine), and fixed-seed
    results do not depend on the core count."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class _QuietHandler(SimpleHTTPRequestHandler):
    """Static file handler that keeps per-request log lines out of the test output."""

    def log_message(self, format: str, *args: object) -> None:
        """Drop the access log line."""


@pytest.fixture
def http_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """Serve a fresh directory over HTTP on 127.0.0.1 (random free port); yield (base_url, directory)."""
    directory = tmp_path_factory.mktemp("served")
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    # A short poll interval keeps shutdown (which waits for the next poll) from adding ~0.5 s per test.
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield f"http://{host}:{port}", directory
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
