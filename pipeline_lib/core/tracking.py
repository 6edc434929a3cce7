"""MLflow tracking: one run per stage execution, with lineage tags, flat params and batched metrics.

Store: `MLFLOW_TRACKING_URI` when set (a team's `mlflow server`), else `sqlite:///<root>/mlflow.db` with
artifacts under `<root>/mlartifacts`, where root is `$DVC_ROOT` when DVC runs the stage (it may run it in
a temporary copy) and otherwise the project folder around the working directory.

Trainers and stages talk to a `Tracker`. The base class does nothing, so a unit test that asks for it can
run a trainer without MLflow; `stage_run` hands out an `MlflowTracker` bound to a live run.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.parse
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pipeline_lib.core.config import CoreParams, params_hash

MAX_BATCH = 1000  # MLflow's limit on metrics per log_batch call
PROBE_TIMEOUT_S = 10  # seconds one request to a tracking server may take before the stage gives up


class TrackingUnavailable(RuntimeError):
    """The tracking server cannot be reached or refuses our requests; the message names the URI."""


def project_root() -> Path:
    """`$DVC_ROOT` if DVC is running us, else the nearest folder up from here holding `dvc.yaml`."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    here = Path.cwd().resolve()
    return next((p for p in (here, *here.parents) if (p / "dvc.yaml").is_file()), here)


def tracking_uri(root: Path | None = None) -> str:
    """The tracking URI every stage logs to."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(root or project_root()) / 'mlflow.db'}"


def check_tracking_store(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise `TrackingUnavailable` within seconds if the tracking server at `uri` is down or refuses us.

    MLflow retries a failing request with exponential backoff for minutes; this one request does not retry,
    so a wrong URI, a stopped server or bad credentials stop a stage before any work instead of after
    it. Local stores (sqlite, files) are not probed.
    """
    if urllib.parse.urlsplit(uri).scheme not in ("http", "https"):
        return
    import mlflow
    from mlflow.exceptions import MlflowException

    limits = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(timeout))}
    saved = {name: os.environ.get(name) for name in limits}
    os.environ.update(limits)
    try:
        mlflow.MlflowClient(uri).search_experiments(max_results=1)
    except MlflowException as err:
        reason = str(err).strip().splitlines()[0].replace(uri, redacted(uri))[:300]
        raise TrackingUnavailable(
            f"tracking server {redacted(uri)} is unreachable or refused the request ({reason}); check "
            "MLFLOW_TRACKING_URI and the server's credentials, or unset it to log to the project's mlflow.db"
        ) from err
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def redacted(uri: str) -> str:
    """`uri` with any password replaced by `***`, for messages and logs."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def artifact_location(uri: str, root: Path) -> str | None:
    """Artifacts of a local sqlite store live beside it; a tracking server chooses its own store."""
    if not uri.startswith("sqlite:///"):
        return None
    database = Path(uri.removeprefix("sqlite:///"))
    folder = root / "mlartifacts" if database == root / "mlflow.db" else database.parent / "mlartifacts"
    return folder.resolve().as_uri()


class Tracker:
    """The interface trainers and stages log through. This base class records nothing."""

    run_id: str | None = None
    lineage: dict[str, str] = {}  # noqa: RUF012 - the run's lineage tags, copied onto model versions

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log flat dotted params."""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log scalar metrics at `step` (buffered; see `flush`)."""

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags."""

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Copy a local file or folder into the run's artifacts."""

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        """Save a matplotlib figure as an artifact."""

    def log_dict(self, dictionary: Mapping[str, Any], artifact_file: str) -> None:
        """Save a JSON or YAML document as an artifact."""

    def log_text(self, text: str, artifact_file: str) -> None:
        """Save text (e.g. a generated sample) as an artifact."""

    def log_dataset(
        self, images: np.ndarray, labels: np.ndarray | None, *, name: str, source: str, sha256: str, context: str
    ) -> None:
        """Record a dataset as an input of the run, identified by its digest."""

    def flush(self) -> None:
        """Send buffered metrics."""


class MlflowTracker(Tracker):
    """A `Tracker` bound to one MLflow run; metric writes are batched."""

    def __init__(self, run_id: str, flush_every: int = 200) -> None:
        import mlflow

        self.run_id = run_id
        self._client = mlflow.MlflowClient()
        self._pending: list[Any] = []
        self._flush_every = flush_every

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        entries = [Param(key, _param_text(value)) for key, value in params.items()]
        for start in range(0, len(entries), 100):  # MLflow accepts at most 100 params per batch
            self._client.log_batch(self.run_id, params=entries[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), timestamp, step or 0) for k, v in metrics.items()]
        if len(self._pending) >= self._flush_every:
            self.flush()

    def flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
            self._client.log_batch(self.run_id, metrics=batch)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self._client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        self._client.log_figure(self.run_id, figure, artifact_file)

    def log_dict(self, dictionary: Mapping[str, Any], artifact_file: str) -> None:
        self._client.log_dict(self.run_id, dict(dictionary), artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._client.log_text(self.run_id, text, artifact_file)

    def log_dataset(
        self, images: np.ndarray, labels: np.ndarray | None, *, name: str, source: str, sha256: str, context: str
    ) -> None:
        import mlflow

        with warnings.catch_warnings():
            # MLflow registers its local-file source class twice and warns that a path is ambiguous.
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            dataset = mlflow.data.from_numpy(images, source=source, targets=labels, name=name, digest=sha256[:16])
        mlflow.log_input(dataset, context=context, tags={"sha256": sha256})


def _param_text(value: Any) -> str:
    """CoreParams as YAML spells them, so `null` and `true` read the same in the UI as in params.yaml."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    return str(value)


def git_state(root: Path) -> dict[str, str]:
    """Commit and dirty flag of the repository at `root` ("unknown" outside git).

    `git.dirty` is "true" exactly when the tracked source differs from the commit: a tracked file changed,
    other than what DVC writes while the pipeline runs (`dvc.lock`, the outs it records there, such as committed
    metrics and plots, and the `.gitignore` files it keeps for its outs). So every stage of a `dvc repro` on a
    clean checkout is clean, and a `dvc exp run -S ...` (which edits params.yaml) is dirty. When dirty,
    `git.dirty_paths` names the changed files (the first 20, relative to `root`).
    """
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout if done.returncode == 0 else None

    commit, top = git("rev-parse", "HEAD"), git("rev-parse", "--show-toplevel")
    if commit is None or top is None:
        return {"git.commit": "unknown", "git.dirty": "unknown"}
    status = git("status", "--porcelain", "-z", "--untracked-files=no")
    if status is None:
        return {"git.commit": commit.strip(), "git.dirty": "unknown"}
    written = dvc_written(root, committed_lock=git("show", "HEAD:./dvc.lock"))
    changed = [path for path in _status_paths(status, Path(top.strip())) if not _under(path, written)]
    tags = {"git.commit": commit.strip(), "git.dirty": str(bool(changed)).lower()}
    if changed:
        tags["git.dirty_paths"] = ", ".join(_relative(path, root) for path in changed[:20])
    return tags


# libyaml's safe loader where PyYAML was built with it: a lock file of a hundred stages parses in 0.03 s, not 0.25 s,
# and every stage run reads two (the working and the committed one)
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def dvc_written(root: Path, committed_lock: str | None = None) -> set[Path]:
    """What DVC writes as the pipeline runs: `dvc.lock` and every out it records there, in the working copy's
    lock and in the committed one (`committed_lock`, its text), as absolute paths."""
    root = Path(root).resolve()
    written = {root / "dvc.lock"}
    texts = [committed_lock] if committed_lock else []
    if (root / "dvc.lock").is_file():
        texts.append((root / "dvc.lock").read_text())
    for text in texts:
        try:
            stages = (yaml.load(text, Loader=_SAFE_LOADER) or {}).get("stages", {})
        except yaml.YAMLError:
            continue
        for stage in stages.values() if isinstance(stages, dict) else ():
            for out in stage.get("outs", []) if isinstance(stage, dict) else ():
                if isinstance(out, dict) and isinstance(out.get("path"), str):
                    written.add((root / out["path"]).resolve())
    return written


def _status_paths(status: str, top: Path) -> list[Path]:
    """The paths of `git status --porcelain -z` (both sides of a rename or copy), absolute."""
    entries, paths = status.split("\0"), []
    index = 0
    while index < len(entries):
        entry = entries[index]
        if entry:
            paths.append((top / entry[3:]).resolve())
            if entry[0] in "RC":  # the next entry is the path it was renamed or copied from
                index += 1
                paths.append((top / entries[index]).resolve())
        index += 1
    return paths


def _under(path: Path, written: set[Path]) -> bool:
    """Whether DVC wrote `path`: it is one of `written`, inside one of them, or a `.gitignore` DVC keeps."""
    return path.name == ".gitignore" or any(path == out or out in path.parents for out in written)


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(Path(root).resolve()))
    except ValueError:
        return str(path)


def lineage_tags(
    stage: str,
    root: Path,
    logged_params: Mapping[str, Any],
    inputs: Mapping[str, str],
    upstream: Mapping[str, str],
) -> dict[str, str]:
    """The tags every stage run carries: stage, git state, DVC experiment, params hash, inputs, upstream runs."""
    tags = {"stage": stage, **git_state(root), "params.hash": params_hash(logged_params)}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
    tags.update({f"input.{name}.sha256": digest for name, digest in inputs.items()})
    tags.update({f"upstream.{name}.run_id": run_id for name, run_id in upstream.items()})
    return tags


def _experiment_id(name: str, uri: str, root: Path) -> str:
    import mlflow
    from mlflow.exceptions import MlflowException

    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return mlflow.create_experiment(name, artifact_location=artifact_location(uri, root))
    except MlflowException:  # created meanwhile by another process
        return mlflow.get_experiment_by_name(name).experiment_id


def _unfinished_run(run_id: str | None, experiment_id: str) -> str | None:
    """`run_id` if it is a run of this experiment in this store that did not finish, else None."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if not run_id:
        return None
    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except MlflowException:
        return None
    if run.info.experiment_id != experiment_id or run.info.status == "FINISHED":
        return None
    return run_id


@contextmanager
def stage_run(
    stage: str,
    params: CoreParams,
    logged_params: Mapping[str, Any],
    *,
    inputs: Mapping[str, str] | None = None,
    upstream: Mapping[str, str] | None = None,
    resume_run_id: str | None = None,
    extra_tags: Mapping[str, str] | None = None,
) -> Iterator[MlflowTracker]:
    """Open the MLflow run of one stage execution; it ends FAILED if the body raises.

    Args:
        stage: the DVC stage name; also the run name.
        params: the validated params (for the experiment name).
        logged_params: the flat dotted params this stage uses, logged and hashed.
        inputs: name -> sha256 of each input (data, upstream model), logged as `input.<name>.sha256` tags.
        upstream: stage -> run id of the runs that produced this stage's inputs.
        resume_run_id: the run of an interrupted execution this one continues (from a checkpoint); it is
            reopened if it exists in this store and did not finish, so one run shows the whole curve.
        extra_tags: further lineage tags (e.g. the registered encoder version a classifier starts from); like
            the others they are copied onto any model version the run registers.
    """
    import mlflow

    root = project_root()
    uri = tracking_uri(root)
    check_tracking_store(uri)
    mlflow.set_tracking_uri(uri)
    experiment_id = _experiment_id(params.tracking.experiment, uri, root)
    tags = {**lineage_tags(stage, root, logged_params, inputs or {}, upstream or {}), **(extra_tags or {})}
    resumable = _unfinished_run(resume_run_id, experiment_id)
    start = {"run_id": resumable} if resumable else {"experiment_id": experiment_id, "run_name": stage, "tags": tags}
    with mlflow.start_run(**start) as run:
        if resumable:
            MlflowTracker(resumable).set_tags({"resumed": "true"})
        tracker = MlflowTracker(run.info.run_id)
        tracker.lineage = {key: value for key, value in tags.items() if key != "mlflow.runName"}
        tracker.log_params(logged_params)
        try:
            yield tracker
        finally:
            tracker.flush()


def write_run_record(path: Path, tracker: Tracker, **extra: Any) -> None:
    """Write `run.json` (run id, tracking URI, extras) atomically, for downstream stages and cached reruns."""
    import mlflow

    write_json_atomic(path, {"run_id": tracker.run_id, "tracking_uri": mlflow.get_tracking_uri(), **extra})


def read_run_record(folder: Path) -> dict[str, Any]:
    """The `run.json` an upstream stage left in its out ({} when absent)."""
    path = Path(folder) / "run.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def upstream_model(folder: Path | None, sha256: str) -> dict[str, Any]:
    """The lineage a model records of the model it started from: the weights' sha256 and, from the upstream
    folder's `run.json`, the run, registered name and version that made them (None where unknown or fresh)."""
    record = read_run_record(folder) if folder is not None else {}
    return {"sha256": sha256, **{key: record.get(key) for key in ("run_id", "model_name", "model_version")}}


def upstream_runs(folders: Mapping[str, Path | None]) -> dict[str, str]:
    """Stage -> run id of the run that wrote each folder, from its `run.json` ("unknown" when it has none); the
    lineage `stage_run` tags as `upstream.<stage>.run_id`. A None folder (an optional input left out) is skipped."""
    return {stage: read_run_record(folder).get("run_id", "unknown")
            for stage, folder in folders.items() if folder is not None}


def write_json_atomic(path: Path, document: Mapping[str, Any]) -> None:
    """Write JSON to a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.tmp")
    partial.write_text(json.dumps(dict(document), indent=2) + "\n")
    partial.replace(path)
