"""Stages against a real `mlflow server` on 127.0.0.1, and against servers that are down or refuse requests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import mlflow
import mlflow.pyfunc
import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ENCODER = "ssl-pipeline-encoder"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow server` with a temporary sqlite backend, serving artifacts from a temporary folder."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{folder}/mlflow.db", "--artifacts-destination", str(folder / "art")]
    log = open(folder / "server.log", "w")  # noqa: SIM115 - open for the server's whole life
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, (folder / "server.log").read_text()
            time.sleep(0.5)
        yield uri
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def _stage(name: str, params: Path, uri: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", f"stages.{name}", "--params", str(params), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def params(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny params: 200 digits, a one-block ViT, two epochs of MAE."""
    path = tmp_path_factory.mktemp("params") / "params.yaml"
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["device"] = "cpu"
    params["data"]["max_images"] = 200
    params["model"].update(embed_dim=32, depth=1, num_heads=2)
    params["pretrain"].update(epochs=2, batch_size=32, warmup_epochs=1.0, decoder_embed_dim=32, decoder_depth=1,
                              decoder_num_heads=2, log_every=1)
    path.write_text(yaml.safe_dump(params))
    return path


def test_stages_record_runs_metrics_artifacts_and_model_versions_on_the_server(
    server: str, params: Path, tmp_path: Path
) -> None:
    data, model = tmp_path / "prepared", tmp_path / "pretrain"
    fetched = _stage("fetch", params, server, "--out", str(data), "--cache-dir", str(tmp_path / "cache"))
    assert fetched.returncode == 0, fetched.stderr
    trained = _stage("pretrain", params, server, "--data", str(data), "--out", str(model), "--metrics",
                     str(tmp_path / "pretrain.json"), "--plots", str(tmp_path / "plots"),
                     "--checkpoints", str(tmp_path / "checkpoints"))
    assert trained.returncode == 0, trained.stderr

    client = mlflow.MlflowClient(server)
    experiment = client.get_experiment_by_name("ssl-pipeline")
    runs = {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"fetch", "pretrain"} and all(r.info.status == "FINISHED" for r in runs.values())
    fetch, pretrain = runs["fetch"], runs["pretrain"]
    assert fetch.data.params["data.max_images"] == "200" and fetch.data.metrics["labeled.num_images"] == 16
    assert {"samples.png", "prepared"} <= {a.path for a in client.list_artifacts(fetch.info.run_id)}
    assert pretrain.data.tags["upstream.fetch.run_id"] == fetch.info.run_id
    assert len(client.get_metric_history(pretrain.info.run_id, "loss")) == 2 * (160 // 32)
    artifacts = {a.path for a in client.list_artifacts(pretrain.info.run_id)}
    assert "examples.png" in artifacts or "reconstruction.png" in artifacts, artifacts
    picture = client.download_artifacts(pretrain.info.run_id, sorted(artifacts & {"reconstruction.png"})[0],
                                        str(tmp_path / "download"))
    assert Path(picture).stat().st_size > 0  # the bytes went to the server's artifact store and back

    version = client.get_model_version_by_alias(ENCODER, "challenger")
    assert version.run_id == pretrain.info.run_id
    assert version.tags["input.data.sha256"] == pretrain.data.tags["input.data.sha256"]
    mlflow.set_tracking_uri(server)
    features = mlflow.pyfunc.load_model(f"models:/{ENCODER}@challenger").predict(
        np.load(data / "test" / "images.npy")[:3])
    assert features.shape == (3, 32)

    gate = subprocess.run([sys.executable, "-m", "pipeline_lib.promote", "--params", str(params),
                           "--model", "encoder", "-S", "promote.encoder.metric=loss", "-S",
                           "promote.encoder.mode=min"],
                          cwd=ROOT, env={**os.environ, "MLFLOW_TRACKING_URI": server},
                          capture_output=True, text=True, timeout=120)
    assert gate.returncode == 0, gate.stderr
    assert f"promoted v{version.version} to champion" in gate.stdout and server in gate.stdout
    assert client.get_model_version_by_alias(ENCODER, "champion").version == version.version


class _Refusing(BaseHTTPRequestHandler):
    """Answers every request with the status in `self.server.status` (a proxy in front of a stopped server,
    or one that rejects our credentials)."""

    def do_GET(self) -> None:
        self.send_error(self.server.status)

    do_POST = do_GET

    def log_message(self, format: str, *args: object) -> None:
        """Keep the test output clean."""


@pytest.mark.parametrize("status", [None, 403, 503], ids=["connection-refused", "forbidden", "unavailable"])
def test_a_server_that_is_down_or_refuses_fails_the_stage_within_seconds(
    status: int | None, params: Path, tmp_path: Path
) -> None:
    if status is None:
        uri, stub = f"http://127.0.0.1:{_free_port()}", None
    else:
        stub = ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
        stub.status = status
        threading.Thread(target=stub.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        uri = f"http://127.0.0.1:{stub.server_address[1]}"
    try:
        started = time.monotonic()
        done = _stage("fetch", params, uri, "--out", str(tmp_path / "prepared"), "--cache-dir", str(tmp_path / "c"))
        elapsed = time.monotonic() - started
    finally:
        if stub is not None:
            stub.shutdown()
            stub.server_close()
    assert done.returncode != 0
    assert f"fetch: tracking server {uri} is unreachable or refused the request" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert elapsed < 60, f"took {elapsed:.0f} s"  # imports take most of it; no retry backoff
    assert not (tmp_path / "prepared").exists()  # failed before any work
