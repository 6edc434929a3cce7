"""The text_pretrain entry with the architecture knobs: MoE, multi-token prediction, `hparams: auto`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline_lib.core.tracking import Tracker
from pipeline_lib.params import params_from_dict
from pipeline_lib.text.data.corpus import prepare_text
from pipeline_lib.text.hparams import law_batch_tokens
from pipeline_lib.text.models.saved import load_lm
from pipeline_lib.text.pretrain import LMPaths, run_text_pretrain

pytestmark = pytest.mark.usefixtures("one_thread")


class Recorder(Tracker):
    """Keeps what a run logs."""

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}
        self.metrics: list[dict[str, float]] = []

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.params.update(params)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.metrics.append(dict(metrics))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    (root / "text").mkdir()
    (root / "text" / "a.txt").write_text("the cat sat on the mat.\n" * 40 + "a dog ran.\n" * 10)
    prepare_text("folder", path=root / "text", val_fraction=0.2, out_dir=root / "data", cache_dir=root / "cache")
    return root / "data"


def _run(corpus: Path, tmp_path: Path, objective: str = "ar", **sections: dict[str, Any]) -> tuple[
        dict[str, Any], LMPaths, Recorder]:
    model = {"d_model": 16, "n_layer": 2, "n_head": 2, "seq_len": 8, **sections.get("text_model", {})}
    pretrain = {"epochs": 1, "batch_size": 4, "warmup_epochs": 0.0, "log_every": 1, "mdm_init": "scratch",
                **sections.get("text_pretrain", {})}  # each architecture from fresh weights
    params = params_from_dict({"device": "cpu", "text_model": model, "text_pretrain": pretrain})
    paths = LMPaths(corpus, tmp_path / "model", tmp_path / "m.json", tmp_path / "plots", tmp_path / "ck")
    recorder = Recorder()
    return run_text_pretrain(params, paths, objective, recorder, torch.device("cpu")), paths, recorder


@pytest.mark.parametrize("objective", ["ar", "mdm"])
def test_moe_model_trains_logs_each_expert_and_reloads(corpus: Path, tmp_path: Path, objective: str) -> None:
    moe = {"enabled": True, "routed_experts": 4, "top_k": 2, "bias_update_speed": 0.01, "balance_loss_alpha": 1.0e-3}
    summary, paths, recorder = _run(corpus, tmp_path, objective, text_model={"moe": moe})
    assert 0 <= summary["moe.max_violation"] < 4 - 1 + 1e-6
    logged = recorder.metrics[0]
    assert {"moe.layer0.load.e3", "moe.layer1.max_violation", "balance_loss"} <= logged.keys()
    model, _, config = load_lm(paths.out)
    assert config["moe"]["routed_experts"] == 4
    assert model.blocks[0].mlp.expert_bias.abs().sum() > 0  # the trained bias travels with the weights
    weights = load_file(paths.out / "model.safetensors")
    torch.testing.assert_close(model.blocks[1].mlp.expert_bias, weights["blocks.1.mlp.expert_bias"])


def test_mtp_is_trained_and_left_out_of_the_model_folder(corpus: Path, tmp_path: Path) -> None:
    summary, paths, recorder = _run(corpus, tmp_path, text_pretrain={"mtp_depth": 1})
    assert {"mtp_loss", "mtp1_accuracy", "accuracy", "next_token_loss"} <= recorder.metrics[0].keys()
    assert summary["loss"] == pytest.approx(summary["next_token_loss"] + 0.3 * summary["mtp_loss"], rel=1e-5)
    weights = load_file(paths.out / "model.safetensors")
    assert not any("depths" in key for key in weights)
    _model, _, config = load_lm(paths.out)  # a plain language model: strict load of the saved keys
    assert "mtp" not in str(config)
    plain, _, _ = _run(corpus, tmp_path / "plain")
    assert summary["params"] == plain["params"]  # the exported model is as big as one trained without MTP


def test_mdm_ignores_mtp_and_says_so(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _summary, _paths, recorder = _run(corpus, tmp_path, "mdm", text_pretrain={"mtp_depth": 1})
    assert "mtp_depth applies to ar only" in capsys.readouterr().out
    assert "mtp_loss" not in recorder.metrics[0]


def test_auto_hparams_set_the_batch_and_lr_and_log_both(corpus: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    summary, _paths, recorder = _run(corpus, tmp_path, text_pretrain={"hparams": "auto"})
    logged = recorder.params
    assert logged["hparams.fit"] == "below" and logged["hparams.capped"] != "none"
    assert logged["hparams.law.batch_tokens"] == pytest.approx(law_batch_tokens(logged["hparams.compute"]))
    assert logged["hparams.used.lr"] < logged["hparams.law.lr"]  # capped at the fitted range's largest lr
    batch = logged["hparams.used.batch_size"]
    windows = (np.fromfile(corpus / "train.bin", dtype=np.uint16).size - 1) // 8
    assert summary["steps"] == windows // batch  # one epoch in batches of the law's size
    peak = max(row["lr"] for row in recorder.metrics if "lr" in row)
    assert 0.5 * logged["hparams.used.lr"] < peak <= logged["hparams.used.lr"] * (1 + 1e-9)  # the used lr trains
    out = capsys.readouterr().out
    assert "hparams auto" in out and "warning: compute budget" in out


def test_auto_hparams_at_a_declared_budget(corpus: Path, tmp_path: Path) -> None:
    _, _, recorder = _run(corpus, tmp_path, text_pretrain={"hparams": "auto", "compute_budget": 1.0e+18})
    logged = recorder.params
    assert logged["hparams.compute"] == 1.0e18 and logged["hparams.fit"] == "within"
    assert logged["hparams.used.lr"] == pytest.approx(logged["hparams.law.lr"])
