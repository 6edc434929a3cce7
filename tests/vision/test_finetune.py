"""Finetuning in-process on tiny data: the recipe's parts, the linear probe, outputs and the registered model."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import mlflow.pyfunc
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline_lib.core.errors import ConfigError
from pipeline_lib.core.tracking import Tracker, stage_run
from pipeline_lib.params import Params, params_from_dict
from pipeline_lib.vision.config import DataParams
from pipeline_lib.vision.data.prepare import prepare_dataset
from pipeline_lib.vision.data.store import read_split
from pipeline_lib.vision.finetune import FinetunePaths, FinetuneTrainer, build_classifier, recipe, run_finetune
from pipeline_lib.vision.models.factory import load_network
from pipeline_lib.vision.pretrain import PretrainPaths, run_pretrain

TINY_VIT = {"name": "vit", "patch_size": 2, "embed_dim": 32, "depth": 2, "num_heads": 2}


def tiny_params(model: dict | None = None, **finetune: object) -> Params:
    return params_from_dict({
        "device": "cpu",
        "model": model or TINY_VIT,
        "pretrain": {"epochs": 1, "batch_size": 16, "warmup_epochs": 0.0, "decoder_embed_dim": 32,
                     "decoder_num_heads": 2, "decoder_depth": 1},
        "finetune": {"epochs": 2, "batch_size": 16, "warmup_epochs": 1.0, "log_every": 1, **finetune},
    })


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    prepare_dataset(DataParams(max_images=160, label_fraction=0.5), 0, root / "prepared", root / "cache")
    return root / "prepared"


@pytest.fixture(scope="module")
def encoder_dir(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pretrain")
    paths = PretrainPaths(prepared, root / "encoder", root / "m.json", root / "plots", root / "ck")
    run_pretrain(tiny_params(), paths, Tracker(), torch.device("cpu"))
    return paths.out


def _paths(prepared: Path, encoder: Path | None, root: Path) -> FinetunePaths:
    return FinetunePaths(prepared, encoder, root / "model", root / "metrics.json", root / "plots", root / "ck")


def _trainer(params: Params, prepared: Path, encoder: Path | None, root: Path) -> FinetuneTrainer:
    labeled = read_split(prepared, "labeled")
    model, preprocess = build_classifier(params, _paths(prepared, encoder, root), in_chans=1, img_size=8,
                                         num_classes=10, pixel_stats=(labeled.meta["pixel_mean"],
                                                                      labeled.meta["pixel_std"]))
    return FinetuneTrainer(model, params.finetune, labeled.images, preprocess, labels=np.asarray(labeled.labels),
                           num_classes=10, device=torch.device("cpu"), seed=0, checkpoint_dir=root / "ck",
                           tracker=Tracker(), fingerprint="test")


def test_finetune_starts_from_the_encoder_and_changes_every_layer(prepared: Path, encoder_dir: Path,
                                                                   tmp_path: Path) -> None:
    trainer = _trainer(tiny_params(), prepared, encoder_dir, tmp_path)
    pretrained = load_file(encoder_dir / "encoder.safetensors")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    for key, value in pretrained.items():
        assert torch.equal(before[key], value), key  # the encoder's weights, not a fresh init
    trainer.train_step(0)
    trainer.train_step(1)
    after = trainer.model.state_dict()
    frozen = {"pos_embed"}  # MAE's fixed sin-cos position embedding
    for name, _ in trainer.model.named_parameters():
        if name not in frozen:
            assert not torch.equal(before[name], after[name]), f"{name} did not change"


def test_layer_decay_scales_lr_by_depth(prepared: Path, tmp_path: Path) -> None:
    trainer = _trainer(tiny_params(layer_decay=0.5), prepared, None, tmp_path)
    lrs = sorted({round(group["initial_lr"] / trainer.lr, 6) for group in trainer.optimizer.param_groups})
    # depth 2: embeddings, block 0, block 1, head -> 0.5^3, 0.5^2, 0.5, 1
    assert lrs == [0.125, 0.25, 0.5, 1.0]
    head = trainer.model.get_classifier().weight
    head_group = next(g for g in trainer.optimizer.param_groups if any(p is head for p in g["params"]))
    assert head_group["initial_lr"] == pytest.approx(trainer.lr)


def test_linear_probe_leaves_the_encoder_unchanged(prepared: Path, encoder_dir: Path, tmp_path: Path) -> None:
    trainer = _trainer(tiny_params(mode="linear_probe", drop_path_rate=0.2), prepared, encoder_dir, tmp_path)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    for step in range(3):
        trainer.train_step(step)
    after = trainer.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"head.weight", "head.bias"}
    assert not trainer.model.blocks.training and trainer.model.get_classifier().training  # drop path stays off


@pytest.mark.parametrize("options", [{"crop_scale_min": 0.5, "flip_p": 0.5},
                                     {"mixup_alpha": 0.8, "cutmix_alpha": 1.0}], ids=["crop-flip", "mixup-cutmix"])
def test_regularisers_are_deterministic_per_step(prepared: Path, tmp_path: Path, options: dict) -> None:
    runs = []
    for attempt in range(2):
        trainer = _trainer(tiny_params(**options), prepared, None, tmp_path / str(attempt))
        runs.append([trainer.train_step(step)["loss"].item() for step in range(2)])
    assert runs[0] == runs[1] and all(np.isfinite(runs[0]))


def test_checkpoint_resume_matches_a_straight_run(prepared: Path, tmp_path: Path) -> None:
    params = tiny_params(epochs=2, checkpoint_every=3)
    straight = _trainer(params, prepared, None, tmp_path / "straight")
    straight.fit()
    first = _trainer(params, prepared, None, tmp_path / "resumed")
    first.total_steps = 3  # stop after the first checkpoint, as a killed run would
    first.fit()
    resumed = _trainer(params, prepared, None, tmp_path / "resumed")
    assert resumed.fit().resumed_from == 3
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_mismatched_encoder_is_refused_before_training(prepared: Path, encoder_dir: Path, tmp_path: Path) -> None:
    params = tiny_params(model={**TINY_VIT, "depth": 3})
    with pytest.raises(ValueError, match=r"model.depth=3: must match the encoder in .*, pretrained with depth=2"):
        run_finetune(params, _paths(prepared, encoder_dir, tmp_path), Tracker(), torch.device("cpu"), register=False)
    assert not (tmp_path / "model").exists()


def test_stage_outputs_and_registered_classifier(prepared: Path, encoder_dir: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    params = tiny_params()
    paths = _paths(prepared, encoder_dir, tmp_path)
    with stage_run("finetune", params, {"finetune.epochs": 2}, inputs={"data": "d" * 64},
                   extra_tags={"encoder.model_version": "7"}) as tracker:
        summary = run_finetune(params, paths, tracker, torch.device("cpu"), register=True)

    assert summary["steps"] == 2 * (len(read_split(prepared, "labeled")) // 16)
    assert {p.name for p in paths.out.iterdir()} == {"classifier.safetensors", "config.json", "run.json"}
    assert json.loads(paths.metrics.read_text())["train_accuracy"] == summary["train_accuracy"]
    config = json.loads((paths.out / "config.json").read_text())
    assert config["init"] == "pretrained" and config["num_classes"] == 10 and config["class_names"][3] == "3"

    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias("ssl-pipeline-classifier", "challenger")
    assert version.tags["encoder.model_version"] == "7" and version.tags["input.data.sha256"] == "d" * 64
    served = mlflow.pyfunc.load_model("models:/ssl-pipeline-classifier@challenger")
    assert served.metadata.get_input_schema() is not None and served.metadata.get_output_schema() is not None
    images = np.load(prepared / "test" / "images.npy")[:5]
    probabilities = served.predict(images)
    assert probabilities.shape == (5, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    network, preprocess, _ = load_network(paths.out)
    with torch.no_grad():
        expected = torch.softmax(network(preprocess(torch.from_numpy(images))), dim=1).numpy()
    np.testing.assert_allclose(probabilities, expected, rtol=1e-5, atol=1e-7)


def test_the_baseline_has_its_own_recipe_over_the_finetune_section(tmp_path: Path) -> None:
    """`finetune_scratch` takes every `finetune` key it does not set; `recipe` trains the scratch run with it."""
    params = params_from_dict({"finetune": {"epochs": 7, "base_lr": 1.0e-2}, "finetune_scratch": {"epochs": 30}})
    assert (params.finetune_scratch.epochs, params.finetune_scratch.base_lr) == (30, 1.0e-2)
    assert recipe(params, None).finetune == params.finetune_scratch
    assert recipe(params, tmp_path / "encoder").finetune.epochs == 7
    assert params_from_dict({"finetune": {"epochs": 7}}).finetune_scratch.epochs == 7  # no section: finetune's
    with pytest.raises(ConfigError, match=r"finetune_scratch\.epochs=0: must be a positive integer"):
        params_from_dict({"finetune_scratch": {"epochs": 0}})
