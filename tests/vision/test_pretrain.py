"""Each pretraining method end to end in-process on tiny data: train, export, reload, probe."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline_lib.core.tracking import Tracker
from pipeline_lib.params import params_from_dict
from pipeline_lib.vision.config import DataParams
from pipeline_lib.vision.data.prepare import prepare_dataset
from pipeline_lib.vision.data.store import read_split
from pipeline_lib.vision.models.factory import load_network
from pipeline_lib.vision.pretrain import PretrainPaths, build_pretrain_model, run_pretrain

TINY_VIT = {"name": "vit", "patch_size": 2, "embed_dim": 32, "depth": 1, "num_heads": 2}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    prepare_dataset(DataParams(max_images=120, label_fraction=0.5), 0, root / "prepared", root / "cache")
    return root / "prepared"


@pytest.mark.parametrize(
    ("method", "model", "extra"),
    [
        ("mae", TINY_VIT, {}),
        ("mae", TINY_VIT, {"norm_pix_loss": True, "accumulation_steps": 2}),
        ("simclr", {"name": "resnet18", "img_size": 16}, {}),
        ("simclr", TINY_VIT, {"loss": "margin"}),
        ("mocov3", TINY_VIT, {}),
    ],
    ids=["mae", "mae-normpix-accum", "simclr-resnet18", "simclr-margin", "mocov3"],
)
def test_method_trains_exports_and_reloads(prepared: Path, tmp_path: Path, method: str, model: dict,
                                           extra: dict) -> None:
    params = params_from_dict({
        "device": "cpu",
        "model": model,
        "pretrain": {"method": method, "epochs": 2, "batch_size": 16, "warmup_epochs": 1.0, "base_lr": 1.0e-3,
                     "decoder_embed_dim": 32, "decoder_num_heads": 2, "decoder_depth": 1, "projection_dim": 16,
                     "hidden_dim": 32, "log_every": 1, **extra},
    })
    unlabeled_only = tmp_path / "prepared"  # pretraining reads nothing labeled (dvc.yaml depends on this split)
    shutil.copytree(prepared / "unlabeled", unlabeled_only / "unlabeled")
    paths = PretrainPaths(unlabeled_only, tmp_path / "out", tmp_path / "metrics.json", tmp_path / "plots",
                          tmp_path / "ck")
    summary = run_pretrain(params, paths, Tracker(), torch.device("cpu"))

    assert np.isfinite(summary["loss"]) and "knn_top1" not in summary  # the probes are the evaluate stage's
    assert summary["steps"] == 2 * (len(read_split(prepared, "unlabeled")) // 16)
    assert {p.name for p in paths.out.iterdir()} == {"encoder.safetensors", "config.json", "run.json"}
    assert {p.name for p in paths.plots.iterdir()} == {"loss.csv", "examples.png"}
    assert paths.metrics.is_file()

    encoder, preprocess, config = load_network(paths.out)
    assert config["method"] == method
    pixels = torch.from_numpy(np.ascontiguousarray(read_split(prepared, "test").images[:4]))
    with torch.no_grad():
        features = encoder(preprocess(pixels))
    assert features.shape == (4, config["feature_dim"]) and torch.isfinite(features).all()


def test_mae_needs_a_vit(tmp_path: Path) -> None:
    params = params_from_dict({"model": {"name": "resnet18"}})
    with pytest.raises(ValueError, match=r"pretrain.method='mae': needs a ViT encoder; model.name='resnet18'"):
        build_pretrain_model(params.pretrain, params.model, in_chans=1, img_size=8)
