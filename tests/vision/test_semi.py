"""The semi stage in-process on tiny data: its losses against direct computations, the strong view, the trainers
(the teacher untouched, a resume bit-exact), the outputs and the registered version's lineage, and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from pipeline_lib.core.errors import ConfigError
from pipeline_lib.core.tracking import Tracker, stage_run
from pipeline_lib.params import Params, params_from_dict
from pipeline_lib.vision.config import DataParams
from pipeline_lib.vision.data.augment import StrongAugment, StrongConfig
from pipeline_lib.vision.data.prepare import prepare_dataset
from pipeline_lib.vision.data.store import read_split
from pipeline_lib.vision.finetune import FinetunePaths, run_finetune
from pipeline_lib.vision.losses import distillation_loss, fixmatch_loss
from pipeline_lib.vision.models.factory import load_network
from pipeline_lib.vision.pretrain import PretrainPaths, run_pretrain
from pipeline_lib.vision.semi import SEMI_METHODS, SemiPaths, build_student, check_inputs, run_semi

TINY_VIT = {"name": "vit", "patch_size": 2, "embed_dim": 16, "depth": 1, "num_heads": 2}


def tiny_params(**semi: object) -> Params:
    return params_from_dict({
        "device": "cpu",
        "model": TINY_VIT,
        "pretrain": {"epochs": 1, "batch_size": 16, "warmup_epochs": 0.0, "decoder_embed_dim": 16,
                     "decoder_num_heads": 2, "decoder_depth": 1},
        "finetune": {"epochs": 2, "batch_size": 16, "warmup_epochs": 1.0, "log_every": 1},
        "semi": {"epochs": 2, "batch_size": 32, "labeled_batch_size": 8, "log_every": 1, "checkpoint_every": 3,
                 **semi},
    })


# ------------------------------------------------------------------------------------------------ the losses

def test_fixmatch_loss_is_the_masked_cross_entropy_of_the_strong_view_on_the_weak_views_pseudo_labels() -> None:
    weak = torch.tensor([[4.0, 0.0, 0.0], [0.2, 0.1, 0.0], [0.0, 0.0, 5.0], [0.0, 3.5, 0.0]])
    strong = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    probabilities = torch.softmax(weak, dim=1)
    mask = probabilities.max(dim=1).values >= 0.9  # rows 0, 2, 3 pass (0.96, 0.99, 0.94), row 1 does not
    assert mask.tolist() == [True, False, True, True]
    expected = sum(-torch.log_softmax(strong[i], 0)[int(weak[i].argmax())] for i in range(4) if mask[i]) / 4
    loss, rate = fixmatch_loss(weak, strong, threshold=0.9)
    assert torch.allclose(loss, expected) and rate.item() == 0.75


def test_fixmatch_loss_passes_no_gradient_to_the_weak_view_and_is_zero_when_nothing_is_confident() -> None:
    weak, strong = torch.zeros(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    loss, rate = fixmatch_loss(weak, strong, threshold=0.5)  # uniform weak predictions: 1/3 < 0.5
    assert loss.item() == 0.0 and rate.item() == 0.0
    loss, _ = fixmatch_loss(weak * 0 + torch.eye(3)[[0, 1, 2, 0]] * 9, strong, threshold=0.5)
    loss.backward()
    assert weak.grad is None or not weak.grad.any()
    assert strong.grad is not None and strong.grad.abs().sum() > 0


def test_distillation_loss_is_the_soft_cross_entropy_at_the_temperature() -> None:
    generator = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(5, 4, generator=generator), torch.randn(5, 4, generator=generator)
    for tau in (1.0, 2.0):
        p_teacher = torch.softmax(teacher / tau, dim=1)
        expected = -(p_teacher * torch.log_softmax(student / tau, dim=1)).sum(dim=1).mean()
        assert torch.allclose(distillation_loss(student, teacher, temperature=tau), expected)
    # against itself it is the teacher's entropy, its minimum over students
    entropy = -(torch.softmax(teacher, 1) * torch.log_softmax(teacher, 1)).sum(1).mean()
    assert torch.allclose(distillation_loss(teacher, teacher), entropy)
    assert distillation_loss(student, teacher) > entropy


def test_the_losses_refuse_mismatched_logits_and_bad_hyperparameters() -> None:
    with pytest.raises(ValueError, match="same shape"):
        fixmatch_loss(torch.randn(4, 3), torch.randn(4, 2), threshold=0.9)
    with pytest.raises(ValueError, match="threshold"):
        fixmatch_loss(torch.randn(4, 3), torch.randn(4, 3), threshold=0.0)
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(torch.randn(4, 3), torch.randn(4, 3), temperature=0.0)


# ---------------------------------------------------------------------------------------------- the strong view

def test_the_strong_view_is_deterministic_given_its_draws_and_the_identity_when_switched_off() -> None:
    images = torch.rand(6, 1, 8, 8)
    augment = StrongAugment(StrongConfig(), 8)
    draws = augment.sample(6, torch.Generator().manual_seed(3), "cpu")
    out = augment.apply(images, draws)
    assert out.shape == images.shape and torch.equal(out, augment.apply(images, draws))
    assert not torch.allclose(out, images) and out.min() >= 0 and out.max() <= 1
    off = StrongAugment(StrongConfig(rotation=0, shift=0, scale=(1, 1), shear=0, cutout=(0, 0)), 8)
    assert torch.allclose(off.apply(images, off.sample(6, torch.Generator().manual_seed(3), "cpu")), images,
                          atol=1e-6)


def test_cutout_writes_the_fill_over_its_square_and_nothing_else() -> None:
    images = torch.zeros(1, 1, 8, 8)
    augment = StrongAugment(StrongConfig(rotation=0, shift=0, scale=(1, 1), shear=0, cutout=(0.5, 0.5)), 8)
    draws = augment.sample(1, torch.Generator().manual_seed(0), "cpu")
    draws["cutout"] = torch.tensor([[0.5, 0.5, 0.5]])  # centred, 4 px wide
    out = augment.apply(images, draws)[0, 0]
    assert (out[2:6, 2:6] == 0.5).all() and out.sum().item() == 16 * 0.5


# ------------------------------------------------------------------------------------------------ the trainers

@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    prepare_dataset(DataParams(max_images=160, label_fraction=0.25), 0, root / "prepared", root / "cache")
    return root / "prepared"


@pytest.fixture(scope="module")
def upstream(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny pretrained encoder and the classifier finetuned from it (no tracking)."""
    root = tmp_path_factory.mktemp("upstream")
    params = tiny_params()
    pretrain = PretrainPaths(prepared, root / "encoder", root / "p.json", root / "pp", root / "pc")
    run_pretrain(params, pretrain, Tracker(), torch.device("cpu"))
    finetune = FinetunePaths(prepared, pretrain.out, root / "finetune", root / "f.json", root / "fp", root / "fc")
    run_finetune(params, finetune, Tracker(), torch.device("cpu"), register=False)
    return pretrain.out, finetune.out


def _paths(prepared: Path, upstream: tuple[Path, Path], root: Path) -> SemiPaths:
    return SemiPaths(prepared, upstream[0], upstream[1], root / "semi", root / "semi.json", root / "plots",
                     root / "checkpoints")


def _trainer(params: Params, paths: SemiPaths, **kwargs: object):
    labeled, unlabeled = read_split(paths.data, "labeled"), read_split(paths.data, "unlabeled")
    student, preprocess = build_student(params, paths, 10)
    extra = {"teacher": load_network(paths.finetuned)[0]} if params.semi.method == "distill" else {}
    return SEMI_METHODS[params.semi.method](
        student, params.semi, unlabeled.images, preprocess, labeled=(labeled.images, np.asarray(labeled.labels)),
        device=torch.device("cpu"), seed=0, checkpoint_dir=paths.checkpoints, tracker=Tracker(), fingerprint="f",
        **extra, **kwargs)


@pytest.mark.parametrize("method", sorted(SEMI_METHODS))
@pytest.mark.parametrize("init", ["finetuned", "encoder"])
def test_a_semi_trainer_changes_the_student_and_never_the_teacher(method: str, init: str, prepared: Path,
                                                                  upstream: tuple[Path, Path], tmp_path: Path) -> None:
    params = tiny_params(method=method, init=init, threshold=0.5, epochs=1)
    trainer = _trainer(params, _paths(prepared, upstream, tmp_path))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    teacher = {k: v.clone() for k, v in trainer.teacher.state_dict().items()} if method == "distill" else {}
    metrics = [trainer.train_step(step) for step in range(2)]
    assert all(torch.isfinite(m["loss"]) for m in metrics)
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    if method == "distill":
        assert all(torch.equal(teacher[k], v) for k, v in trainer.teacher.state_dict().items())
        assert not trainer.teacher.training
        assert all(not p.requires_grad for p in trainer.teacher.parameters())
        assert all(id(p) not in {id(q) for g in trainer.optimizer.param_groups for q in g["params"]}
                   for p in trainer.teacher.parameters())
    else:
        assert 0.0 <= metrics[-1]["mask_rate"].item() <= 1.0


def test_the_labeled_images_of_a_step_are_drawn_from_its_generator(prepared: Path, upstream: tuple[Path, Path],
                                                                   tmp_path: Path) -> None:
    trainer = _trainer(tiny_params(), _paths(prepared, upstream, tmp_path))
    first = [trainer.labeled_batch(batch)[1] for batch in trainer.micro_batches(4)]
    again = [trainer.labeled_batch(batch)[1] for batch in trainer.micro_batches(4)]
    other = [trainer.labeled_batch(batch)[1] for batch in trainer.micro_batches(5)]
    assert torch.equal(first[0], again[0]) and len(first[0]) == 8
    assert not torch.equal(first[0], other[0])


@pytest.mark.parametrize("method", sorted(SEMI_METHODS))
def test_a_resumed_run_ends_bit_identical_to_an_uninterrupted_one(method: str, prepared: Path,
                                                                  upstream: tuple[Path, Path], tmp_path: Path) -> None:
    params = tiny_params(method=method, threshold=0.5)  # 2 epochs of 4 steps, checkpoints every 3rd
    whole = _trainer(params, _paths(prepared, upstream, tmp_path / "whole"))
    whole.fit()
    paths = _paths(prepared, upstream, tmp_path / "killed")
    killed = _trainer(params, paths)
    for step in range(6):
        killed.train_step(step)
    killed.save_checkpoint(6)
    resumed = _trainer(params, paths)
    result = resumed.fit()
    assert result.resumed_from == 6
    for key, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


# ------------------------------------------------------------------------------------------------ the step

def test_the_step_writes_registers_and_traces_its_classifier(prepared: Path, upstream: tuple[Path, Path],
                                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    params = tiny_params(threshold=0.5)
    paths = _paths(prepared, upstream, tmp_path)
    check_inputs(params, paths)
    with stage_run("semi", params, {"seed": 0}, inputs={}, upstream={}) as tracker:
        summary = run_semi(params, paths, tracker, torch.device("cpu"))
    assert summary["method"] == "fixmatch" and summary["steps"] == 8 and "mask_rate" in summary
    config = json.loads((paths.out / "config.json").read_text())
    assert config["semi"] == "fixmatch" and config["num_classes"] == 10
    network, _, _ = load_network(paths.out)
    assert network.num_classes == 10
    record = json.loads((paths.out / "run.json").read_text())
    version = mlflow.MlflowClient().get_model_version(record["model_name"], str(record["model_version"]))
    assert version.tags["started_from"] == "fresh weights (no registered model)"  # the finetuned one registered none
    assert json.loads(paths.metrics.read_text())["steps"] == 8
    assert (paths.plots / "loss.csv").read_text().startswith("step,loss,labeled_loss,unlabeled_loss,mask_rate")


def test_method_none_hands_on_the_finetuned_classifier(prepared: Path, upstream: tuple[Path, Path],
                                                      tmp_path: Path) -> None:
    paths = _paths(prepared, upstream, tmp_path)
    run_semi(tiny_params(method="none"), paths, Tracker(), torch.device("cpu"))
    assert (paths.out / "classifier.safetensors").read_bytes() == (upstream[1] / "classifier.safetensors").read_bytes()
    assert json.loads((paths.out / "config.json").read_text())["semi"] == "none"
    assert (paths.out / "run.json").read_text() == (upstream[1] / "run.json").read_text()


def test_a_label_smoothing_that_caps_the_confidence_below_the_threshold_is_refused(
        prepared: Path, upstream: tuple[Path, Path], tmp_path: Path) -> None:
    paths = _paths(prepared, upstream, tmp_path)
    with pytest.raises(ConfigError, match=r"semi\.label_smoothing=0\.1: caps the confidence at 0\.9100 over 10 "
                                          r"classes, below semi\.threshold=0\.95"):
        check_inputs(tiny_params(label_smoothing=0.1), paths)
    check_inputs(tiny_params(label_smoothing=0.1, method="distill"), paths)  # distillation has no threshold
    check_inputs(tiny_params(label_smoothing=0.1, threshold=0.9), paths)
    assert not paths.out.exists() and not paths.checkpoints.exists()


@pytest.mark.parametrize(("semi", "message"), [
    ({"labeled_batch_size": 64}, r"semi\.labeled_batch_size=64: must be at most the 32 labeled images"),
    ({"batch_size": 256}, r"semi\.batch_size=256: is larger than the 128 unlabeled images"),
])
def test_batches_larger_than_their_split_are_refused(semi: dict, message: str, prepared: Path,
                                                     upstream: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message):
        check_inputs(tiny_params(**semi), _paths(prepared, upstream, tmp_path))


@pytest.mark.parametrize(("semi", "message"), [
    ({"method": "mixmatch"}, r"semi\.method"),
    ({"strong_scale_min": 1.3}, r"semi\.strong_scale_max=1\.2: must be at least semi\.strong_scale_min=1\.3"),
    ({"threshold": 1.5}, r"semi\.threshold"),
    ({"cutout_min": 0.6}, r"semi\.cutout_max=0\.5: must be at least semi\.cutout_min=0\.6"),
])
def test_bad_keys_are_refused_on_load_naming_them(semi: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tiny_params(**semi)
