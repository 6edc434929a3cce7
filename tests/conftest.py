"""Shared pytest fixtures."""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest


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
