"""Registration on a real sqlite MLflow store: one kind of model per name, descriptions, annotated headlines."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import mlflow.pyfunc
import numpy as np
import pytest

from pipeline_lib.core.registry import CHALLENGER, FRESH_WEIGHTS, ModelKind, RegistryError, annotate, register_model

TASK = ModelKind("text", "task-model", "ar")


class Doubler(mlflow.pyfunc.PythonModel):
    """The smallest model that reads its folder: predict multiplies by the folder's factor."""

    def load_context(self, context) -> None:
        self.factor = json.loads((Path(context.artifacts["model_dir"]) / "config.json").read_text())["factor"]

    def predict(self, context, model_input, params=None):
        return np.asarray(model_input, dtype=np.float64) * self.factor


@pytest.fixture
def store(tmp_path: Path) -> mlflow.MlflowClient:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    mlflow.create_experiment("registry", (tmp_path / "artifacts").as_uri())  # no global active experiment
    yield mlflow.MlflowClient(uri)
    mlflow.set_tracking_uri(None)


def _register(tmp_path: Path, kind: ModelKind, *, name: str = "lm-ar", started_from: str | None = None) -> dict:
    folder = tmp_path / f"model-{len(list(tmp_path.glob('model-*')))}"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"factor": 2}))
    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("registry").experiment_id) as run:
        version = register_model(Doubler(), folder, name=name, kind=kind, artifact_name="model",
                                 input_example=np.ones((2, 3)), tags={"stage": "text_sft_ar"},
                                 description=f"what {name} holds", headline="training loss 0.5",
                                 started_from=started_from)
    return {"run_id": run.info.run_id, "tracking_uri": mlflow.get_tracking_uri(), "model_name": name,
            "model_version": version}


def test_a_version_carries_its_kind_lineage_and_descriptions(store: mlflow.MlflowClient, tmp_path: Path) -> None:
    first = _register(tmp_path, TASK)
    second = _register(tmp_path, TASK, started_from="models:/lm-ar/1")
    version = store.get_model_version("lm-ar", str(second["model_version"]))
    assert {key: version.tags[key] for key in ("track", "role", "objective", "stage", "started_from")} == {
        "track": "text", "role": "task-model", "objective": "ar", "stage": "text_sft_ar",
        "started_from": "models:/lm-ar/1"}
    assert version.description == "training loss 0.5\n\nStarted from: models:/lm-ar/1."
    assert store.get_model_version("lm-ar", "1").description.endswith(f"Started from: {FRESH_WEIGHTS}.")
    assert store.get_registered_model("lm-ar").description == "what lm-ar holds"
    assert int(store.get_model_version_by_alias("lm-ar", CHALLENGER).version) == second["model_version"]
    assert first["model_version"] == 1
    loaded = mlflow.pyfunc.load_model("models:/lm-ar@challenger")
    np.testing.assert_array_equal(loaded.predict(np.ones((1, 3))), [[2, 2, 2]])


def test_a_name_holding_another_kind_is_refused_before_logging(store: mlflow.MlflowClient, tmp_path: Path) -> None:
    _register(tmp_path, TASK)
    for other in (ModelKind("text", "task-model", "mdm"), ModelKind("text", "language-model", "ar"),
                  ModelKind("vision", "classifier")):
        with pytest.raises(RegistryError, match=r"'lm-ar' holds .* models \(v1\), not .*name of its own"):
            _register(tmp_path, other)
    assert len(store.search_model_versions("name = 'lm-ar'")) == 1
    assert {m.name for m in store.search_logged_models([store.get_experiment_by_name("registry").experiment_id])} \
        <= {"model"}  # nothing else was registered under the name


def test_annotate_adds_test_figures_and_replaces_the_headline(store: mlflow.MlflowClient, tmp_path: Path) -> None:
    record = _register(tmp_path, TASK, started_from="models:/lm-ar/7")
    assert annotate(record, {"test.accuracy": 0.75}, headline="test exact match 0.7500")
    assert store.get_run(record["run_id"]).data.metrics["test.accuracy"] == 0.75
    assert store.get_model_version("lm-ar", "1").description == (
        "test exact match 0.7500\n\nStarted from: models:/lm-ar/7.")
    assert not annotate({**record, "tracking_uri": "sqlite:////elsewhere.db"}, {"x": 1.0}, headline="x")
