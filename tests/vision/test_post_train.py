"""The rl stage's library entry in-process on tiny data: outputs, report, baselines, bad rewards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline_lib.core.tracking import Tracker
from pipeline_lib.params import Params, params_from_dict
from pipeline_lib.vision.config import DataParams
from pipeline_lib.vision.data.prepare import prepare_dataset
from pipeline_lib.vision.finetune import FinetunePaths, run_finetune
from pipeline_lib.vision.models.classifier import AbstainClassifier
from pipeline_lib.vision.models.factory import load_network
from pipeline_lib.vision.rl import RLPaths, run_rl

TINY_VIT = {"name": "vit", "patch_size": 2, "embed_dim": 32, "depth": 2, "num_heads": 2}


def tiny_params(**rl: object) -> Params:
    return params_from_dict({
        "device": "cpu",
        "model": TINY_VIT,
        "finetune": {"epochs": 3, "batch_size": 16, "warmup_epochs": 1.0},
        "rl": {"epochs": 2, "batch_size": 16, "group_size": 4, "log_every": 1, **rl},
    })


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("rl")
    prepared = root / "prepared"
    prepare_dataset(DataParams(max_images=200, label_fraction=0.3, rl_fraction=0.3), 0, prepared, root / "cache")
    paths = FinetunePaths(prepared, None, root / "finetune", root / "ft.json", root / "ft_plots", root / "ft_ck")
    run_finetune(tiny_params(), paths, Tracker(), torch.device("cpu"), register=False)
    return prepared, paths.out


def _paths(finetuned: tuple[Path, Path], root: Path) -> RLPaths:
    prepared, classifier = finetuned
    return RLPaths(prepared, classifier, root / "rl", root / "rl.json", root / "plots", root / "ck")


def test_post_trains_reports_and_exports(finetuned: tuple[Path, Path], tmp_path: Path) -> None:
    paths = _paths(finetuned, tmp_path)
    summary = run_rl(tiny_params(), paths, Tracker(), torch.device("cpu"))
    assert json.loads(paths.metrics.read_text()) == json.loads(json.dumps(summary))
    for model in ("reference", "post_trained"):
        for key in ("reward_greedy", "reward_sampled", "accuracy", "coverage", "selective_risk", "nll", "ece",
                    "kl_to_reference", "aurc"):
            assert key in summary[model], (model, key)
    assert set(summary["baselines"]) == {"bayes_reference", "expected_reward", "cross_entropy_bayes"}
    assert summary["reference"]["coverage"] == 1.0
    assert summary["reference"]["kl_to_reference"] == pytest.approx(0, abs=1e-6)
    bayes = summary["baselines"]["bayes_reference"]
    assert bayes["reward_sampled"] == bayes["reward_greedy"]  # a fixed rule
    assert summary["gain"]["reward_greedy"] == pytest.approx(
        summary["post_trained"]["reward_greedy"] - summary["reference"]["reward_greedy"])
    model, _, config = load_network(paths.out)
    assert isinstance(model, AbstainClassifier) and config["abstain"] and config["reward"] == "abstain"
    rows = (paths.plots / "risk_coverage.csv").read_text().splitlines()
    assert rows[0] == "model,coverage,risk" and len(rows) == 1 + 2 * summary["test_images"]
    assert (paths.plots / "risk_coverage.png").stat().st_size > 0


def test_accuracy_reward_has_no_abstain(finetuned: tuple[Path, Path], tmp_path: Path) -> None:
    paths = _paths(finetuned, tmp_path)
    summary = run_rl(tiny_params(reward={"type": "accuracy"}), paths, Tracker(), torch.device("cpu"))
    assert summary["post_trained"]["coverage"] == 1.0
    assert not load_network(paths.out)[2]["abstain"]


def test_cost_matrix_from_a_csv(finetuned: tuple[Path, Path], tmp_path: Path) -> None:
    paths = _paths(finetuned, tmp_path)
    costs = tmp_path / "costs.csv"
    matrix = 1 - np.eye(10)
    matrix[3, 8] = 10.0  # calling a true 3 an 8 is expensive
    np.savetxt(costs, matrix, delimiter=",")
    params = tiny_params(reward={"type": "cost_matrix", "cost_matrix": str(costs)})
    summary = run_rl(params, paths, Tracker(), torch.device("cpu"))
    assert summary["reward"]["type"] == "cost_matrix" and summary["post_trained"]["coverage"] == 1.0
    assert -10.0 <= summary["post_trained"]["reward_greedy"] <= 0.0  # rewards are minus costs


def test_cost_matrix_of_the_wrong_shape_fails_before_training(finetuned: tuple[Path, Path], tmp_path: Path) -> None:
    paths = _paths(finetuned, tmp_path)
    costs = tmp_path / "costs.csv"
    np.savetxt(costs, np.ones((3, 3)), delimiter=",")
    params = tiny_params(reward={"type": "cost_matrix", "cost_matrix": str(costs)})
    with pytest.raises(ValueError, match=r"rl\.reward\.cost_matrix='.*costs\.csv': shape \(3, 3\), expected 10 x 10"):
        run_rl(params, paths, Tracker(), torch.device("cpu"))
    assert not paths.checkpoints.exists() and not paths.out.exists()


def test_temperature_rescales_the_logits() -> None:
    from pipeline_lib.vision.rl import with_temperature

    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 0.0, 3.0]])
    expected = torch.softmax(logits / 2.0, dim=1).numpy()
    np.testing.assert_allclose(with_temperature(torch.softmax(logits, 1).double().numpy(), 2.0), expected, rtol=1e-6)
