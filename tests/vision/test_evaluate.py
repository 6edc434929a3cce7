"""The evaluate stage's library entry on tiny data: metrics file, pixel baselines, plots, gain, and the MLflow
annotations."""

from __future__ import annotations

import csv
import json

import mlflow
import numpy as np
import pytest
import torch

from pipeline_lib.core.tracking import Tracker, stage_run
from pipeline_lib.params import params_from_dict
from pipeline_lib.vision.baselines import pixel_baselines
from pipeline_lib.vision.config import DataParams
from pipeline_lib.vision.data.prepare import prepare_dataset
from pipeline_lib.vision.data.store import read_split
from pipeline_lib.vision.evaluate import EvaluatePaths, predict_probabilities, run_evaluate
from pipeline_lib.vision.finetune import FinetunePaths, run_finetune
from pipeline_lib.vision.metrics import classification_metrics
from pipeline_lib.vision.models.factory import load_network
from pipeline_lib.vision.pretrain import PretrainPaths, run_pretrain

PARAMS = params_from_dict({
    "device": "cpu",
    "model": {"embed_dim": 32, "depth": 1, "num_heads": 2},
    "pretrain": {"epochs": 1, "batch_size": 16, "warmup_epochs": 0.0, "decoder_embed_dim": 32,
                 "decoder_num_heads": 2, "decoder_depth": 1},
    "finetune": {"epochs": 3, "batch_size": 16, "warmup_epochs": 1.0},
    "evaluate": {"knn_k": 5, "baseline_folds": 3},
})


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> tuple[EvaluatePaths, str]:
    """fetch -> pretrain -> finetune (ssl, scratch) -> evaluate, tracked in a temporary sqlite store."""
    root = tmp_path_factory.mktemp("pipeline")
    uri = f"sqlite:///{root}/mlflow.db"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.chdir(root)
        prepare_dataset(DataParams(max_images=200, label_fraction=0.5), 0, root / "prepared", root / "cache")
        pretrain = PretrainPaths(root / "prepared", root / "encoder", root / "pm.json", root / "pp", root / "pc")
        run_pretrain(PARAMS, pretrain, Tracker(), torch.device("cpu"))
        classifiers = {}
        for name, encoder in (("ssl", pretrain.out), ("scratch", None)):
            paths = FinetunePaths(root / "prepared", encoder, root / name, root / f"{name}.json", root / f"{name}p",
                                  root / f"{name}c")
            with stage_run(f"finetune-{name}", PARAMS, {}) as tracker:
                run_finetune(PARAMS, paths, tracker, torch.device("cpu"), register=False)
            classifiers[name] = paths.out
        paths = EvaluatePaths(root / "prepared", pretrain.out, classifiers, root / "metrics" / "evaluate.json",
                              root / "plots")
        with stage_run("evaluate", PARAMS, {}) as tracker:
            run_evaluate(PARAMS, paths, tracker, torch.device("cpu"))
    return paths, uri


def test_metrics_file_has_both_models_probes_and_gain(pipeline: tuple[EvaluatePaths, str]) -> None:
    paths, _ = pipeline
    summary = json.loads(paths.metrics.read_text())
    test = read_split(paths.data, "test")
    for name, folder in paths.classifiers.items():
        network, preprocess, _ = load_network(folder)
        probabilities = predict_probabilities(network, preprocess, test.images, device=torch.device("cpu"))
        expected = classification_metrics(probabilities, test.labels, test.meta["class_names"])
        assert summary[name]["top1"] == pytest.approx(expected["top1"])
        assert summary[name]["ece"] == pytest.approx(expected["ece"])
        assert set(summary[name]) == {"top1", "top5", "macro_f1", "nll", "ece", "per_class_accuracy"}
    assert summary["gain"]["top1"] == pytest.approx(summary["ssl"]["top1"] - summary["scratch"]["top1"])
    for name, scores in summary["baselines"].items():
        assert summary["gain"][f"ssl_vs_{name}"] == pytest.approx(summary["ssl"]["top1"] - scores["top1"])
    assert 0 <= summary["encoder"]["knn_top1"] <= 1 and 0 <= summary["encoder"]["linear_probe_top1"] <= 1
    assert summary["labels"] == {"labeled_images": len(read_split(paths.data, "labeled")), "label_fraction": 0.5,
                                 "test_images": len(test)}


def test_metrics_file_has_the_pixel_baselines(pipeline: tuple[EvaluatePaths, str]) -> None:
    """Fitted on labeled (with the evaluate section's folds and the run's seed; LabelSpreading with the unlabeled
    split too), scored on test."""
    paths, _ = pipeline
    labeled, test = read_split(paths.data, "labeled"), read_split(paths.data, "test")
    unlabeled = read_split(paths.data, "unlabeled").images
    expected = pixel_baselines(labeled.images, labeled.labels, test.images, test.labels, seed=PARAMS.seed, folds=3,
                               unlabeled_images=unlabeled)
    assert json.loads(paths.metrics.read_text())["baselines"] == expected
    assert set(expected["pixels_svm"]) == {"top1", "C", "gamma"} and set(expected["pixels_logreg"]) == {"top1"}
    assert set(expected["pixels_label_spreading"]) == {"top1", "kernel", "gamma", "n_neighbors", "alpha"}


def test_plots_for_dvc(pipeline: tuple[EvaluatePaths, str]) -> None:
    paths, _ = pipeline
    assert {p.name for p in paths.plots.iterdir()} == {"confusion.csv", "confusion.png", "reliability.png"}
    with open(paths.plots / "confusion.csv") as handle:
        rows = list(csv.DictReader(handle))
    test = read_split(paths.data, "test")
    assert [row["actual"] for row in rows] == [test.meta["class_names"][i] for i in test.labels]
    summary = json.loads(paths.metrics.read_text())
    assert np.mean([row["actual"] == row["predicted"] for row in rows]) == pytest.approx(summary["ssl"]["top1"])


def test_finetune_runs_carry_their_test_results(pipeline: tuple[EvaluatePaths, str]) -> None:
    paths, uri = pipeline
    client = mlflow.MlflowClient(uri)
    summary = json.loads(paths.metrics.read_text())
    for name, folder in paths.classifiers.items():
        run_id = json.loads((folder / "run.json").read_text())["run_id"]
        run = client.get_run(run_id)
        assert run.data.metrics["test.top1"] == pytest.approx(summary[name]["top1"])
        assert {a.path for a in client.list_artifacts(run_id, "test")} == {"test/confusion.png",
                                                                           "test/reliability.png"}
    evaluate = client.search_runs([client.get_experiment_by_name("ssl-pipeline").experiment_id],
                                  filter_string="attributes.run_name = 'evaluate'")[0]
    assert evaluate.data.metrics["gain.top1"] == pytest.approx(summary["gain"]["top1"])
    svm = summary["baselines"]["pixels_svm"]
    assert evaluate.data.metrics["baselines.pixels_logreg.top1"] == summary["baselines"]["pixels_logreg"]["top1"]
    assert [evaluate.data.metrics[f"baselines.pixels_svm.{key}"] for key in ("top1", "C", "gamma")] == [
        svm["top1"], svm["C"], svm["gamma"]]
    assert evaluate.data.metrics["gain.ssl_vs_pixels_svm"] == pytest.approx(summary["gain"]["ssl_vs_pixels_svm"])
    spreading = summary["baselines"]["pixels_label_spreading"]
    numbers = {key: value for key, value in spreading.items() if isinstance(value, (int, float))}  # not kernel, None
    assert len(numbers) == 3  # top1, alpha and the kernel's gamma or n_neighbors
    assert {key: evaluate.data.metrics[f"baselines.pixels_label_spreading.{key}"] for key in numbers} == numbers
    assert evaluate.data.metrics["gain.ssl_vs_pixels_label_spreading"] == pytest.approx(
        summary["gain"]["ssl_vs_pixels_label_spreading"])
    assert evaluate.data.metrics["ssl.per_class_accuracy.3"] == pytest.approx(summary["ssl"]["per_class_accuracy"]["3"])
