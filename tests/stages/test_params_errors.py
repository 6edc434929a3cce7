"""A params error stops a stage before any work and before any MLflow run, with one line naming the key.

Params whose validity depends on the data are checked by `Params` where params alone say the data's shape (the
digits' 8x8 images), else by each stage's `check_inputs` from the upstream stage's metadata (meta.json,
config.json, the tokenizer), before `stage_run` opens a run. The stages run here as processes in a project copy
whose default tracking store would be `<project>/mlflow.db`; the upstream data is prepared by the library, so the
only MLflow run that could exist is one the refused stage opened.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pipeline_lib.core.errors import ConfigError
from pipeline_lib.params import Params, load_params, params_from_dict
from pipeline_lib.text.data.corpus import prepare_text
from pipeline_lib.text.data.task_data import prepare_task
from pipeline_lib.vision.data.prepare import prepare_dataset

VISION_OUTS = ["--out", "models/pretrain", "--metrics", "metrics/pretrain.json", "--plots", "plots/pretrain",
               "--checkpoints", "checkpoints/pretrain"]


def _stage(project: Path, module: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("MLFLOW_TRACKING_URI", "DVC_ROOT"):
        env.pop(name, None)
    return subprocess.run([sys.executable, "-m", f"stages.{module}", "--params", "params.yaml", *args], cwd=project,
                          env=env, capture_output=True, text=True, timeout=300)


def _refused(done: subprocess.CompletedProcess[str], stage: str, key: str) -> str:
    """The stage failed with one last line `<stage>: <key>=...`; returns that line."""
    assert done.returncode != 0, done.stdout + done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{stage}: {key}="), done.stderr
    return last


def _assert_no_runs(project: Path) -> None:
    store = project / "mlflow.db"
    if not store.exists():
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert not client.search_runs(experiments), "a refused stage left an MLflow run"


def _params(project: Path) -> Params:
    return load_params(project / "params.yaml")


def test_patch_size_against_the_digits_stops_fetch_and_pretrain(make_project: Callable[..., Path],
                                                                tmp_path: Path) -> None:
    def edit(params: dict[str, Any]) -> None:
        params["model"]["patch_size"] = 3

    project = make_project(tmp_path, edit, text=False)
    fetch = _refused(_stage(project, "fetch", "--out", "data/prepared", "--cache-dir", "data/cache"), "fetch",
                     "model.patch_size")
    assert fetch == ("fetch: model.patch_size=3: must divide the image size 8 of data.source 'digits' "
                     "(accepted: 1, 2, 4, 8); or set model.img_size to a multiple of 3")
    assert not (project / "data" / "prepared").exists()
    pretrain = _refused(_stage(project, "pretrain", "--data", "data/prepared", *VISION_OUTS), "pretrain",
                        "model.patch_size")
    assert pretrain.removeprefix("pretrain: ") == fetch.removeprefix("fetch: ")
    _assert_no_runs(project)


def test_imagefolder_patch_size_is_checked_by_pretrain_before_its_run(make_project: Callable[..., Path],
                                                                      tmp_path: Path) -> None:
    """Without data.image_size only the fetched images know their size (6x6 here): pretrain checks it."""
    images = tmp_path / "images"
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (images / label).mkdir(parents=True)
        for index in range(12):
            Image.fromarray(rng.integers(0, 256, (6, 6), dtype=np.uint8)).save(images / label / f"{index}.png")

    def edit(params: dict[str, Any]) -> None:
        params["data"].update(source="imagefolder", path=str(images), label_fraction=0.5)
        params["model"]["patch_size"] = 4
        params["pretrain"]["batch_size"] = 8

    project = make_project(tmp_path / "project", edit, text=False)
    prepare_dataset(_params(project).data, 0, project / "data" / "prepared", project / "data" / "cache")
    line = _refused(_stage(project, "pretrain", "--data", "data/prepared", *VISION_OUTS), "pretrain",
                    "model.patch_size")
    assert line == ("pretrain: model.patch_size=4: must divide the image size 6 of data.source 'imagefolder' in "
                    "data/prepared (accepted: 1, 2, 3, 6); or set model.img_size to a multiple of 4")
    assert not (project / "checkpoints").exists() and not (project / "models").exists()
    _assert_no_runs(project)


@pytest.fixture
def text_project(make_project: Callable[..., Path], tmp_path: Path) -> Path:
    """A project whose text data (a char corpus) and addition task are prepared by the library, not by stages."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("".join(f"{a}+{b}={a + b} and more text\n" for a in range(30) for b in range(9)))

    def edit(params: dict[str, Any]) -> None:
        params["text_data"].update(source="folder", path=str(corpus), tokenizer="char")
        params["text_task"].update(answer_tokens=4)  # "<answer>18</answer><eos>" takes 5

    project = make_project(tmp_path / "project", edit)
    params = _params(project)
    cfg = params.text_data
    prepare_text(cfg.source, path=cfg.path, val_fraction=cfg.val_fraction, tokenizer=cfg.tokenizer,
                 vocab_size=cfg.vocab_size, out_dir=project / "data/text/prepared", cache_dir=project / "data/cache")
    prepare_task(params, project / "data/text/task")
    return project


def test_answers_over_answer_tokens_stop_text_sft_before_its_run(text_project: Path) -> None:
    done = _stage(text_project, "text_sft", "--objective", "ar", "--name", "text_sft_scratch",
                  "--task", "data/text/task", "--data", "data/text/prepared", "--out", "models/text/scratch_ar",
                  "--metrics", "m.json", "--plots", "plots", "--checkpoints", "checkpoints")
    line = _refused(done, "text_sft_scratch_ar", "text_task.answer_tokens")
    assert "the longest train completion" in line and line.endswith("(accepted: >= 5)")
    assert not (text_project / "checkpoints").exists()
    _assert_no_runs(text_project)


# -- the same checks as library calls: each stage's `check_inputs` on real prepared data, no process


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("digits")
    prepare_dataset(params_from_dict({"data": {"max_images": 200}}).data, 0, root / "prepared", root / "cache")
    return root / "prepared"


@pytest.mark.parametrize(("changes", "message"), [
    ({"model": {"name": "vit_small_patch16_224", "patch_size": None}},
     r"^model\.patch_size=None: \(null: the timm model's own patch size 16\) must divide the image size 8 of "
     r"data\.source 'digits' in .* \(accepted: 1, 2, 4, 8\)"),
    ({"model": {"name": "resnet19"}}, r"^model\.name='resnet19': unknown timm model 'resnet19'; close matches"),
    ({"model": {"name": "resnet18"}}, r"^pretrain\.method='mae': needs a ViT encoder; model\.name='resnet18'"),
    ({"model": {"name": "efficientnet_b0", "compound_phi": 12.0}, "pretrain": {"method": "simclr"}},
     r"^model\.compound_phi=12\.0: .*lower model\.compound_phi"),
    ({"pretrain": {"batch_size": 512}}, r"^pretrain\.batch_size=512: is larger than the 160 unlabeled images"),
], ids=["timm-vit-own-patch", "unknown-timm-name", "mae-needs-a-vit", "no-efficientnet-near", "batch-over-split"])
def test_pretrain_checks_its_inputs(digits: Path, tmp_path: Path, changes: dict[str, Any], message: str) -> None:
    from pipeline_lib.vision.pretrain import PretrainPaths, check_inputs

    with pytest.raises(ConfigError, match=message):
        check_inputs(params_from_dict(changes), PretrainPaths(digits, *(tmp_path / n for n in "ompc")))


def test_finetune_checks_its_batch_against_the_labeled_split(digits: Path, tmp_path: Path) -> None:
    from pipeline_lib.vision.finetune import FinetunePaths, check_inputs

    paths = FinetunePaths(digits, None, *(tmp_path / n for n in "ompc"))
    check_inputs(params_from_dict({"finetune": {"batch_size": 16}}), paths)
    with pytest.raises(ConfigError, match=r"^finetune\.batch_size=32: is larger than the 16 labeled images"):
        check_inputs(params_from_dict({}), paths)


def test_rl_checks_the_cost_matrix_against_the_classifier_classes(digits: Path, tmp_path: Path) -> None:
    from pipeline_lib.vision.rl import RLPaths, check_inputs

    classifier = tmp_path / "classifier"
    classifier.mkdir()
    (classifier / "config.json").write_text(json.dumps({"num_classes": 10, "abstain": False,
                                                        "class_names": [str(i) for i in range(10)]}))
    paths = RLPaths(digits, classifier, *(tmp_path / n for n in "ompc"))
    costs = [[0.0, 1.0, 1.0], [1.0, 0.0, 1.0], [1.0, 1.0, 0.0]]
    with pytest.raises(ConfigError, match=r"^rl\.reward\.cost_matrix=\[\[0\.0, 1\.0, 1\.0\], .*: shape \(3, 3\), "
                                          r"expected 10 x 10"):
        check_inputs(params_from_dict({"rl": {"batch_size": 8, "reward": {"type": "cost_matrix",
                                                                           "cost_matrix": costs}}}), paths)
    with pytest.raises(ConfigError, match=r"^rl\.batch_size=32: is larger than the 16 rl images"):
        check_inputs(params_from_dict({}), paths)


def test_semi_refuses_a_label_smoothing_under_its_threshold_before_its_run(make_project: Callable[..., Path],
                                                                            tmp_path: Path) -> None:
    """The cap 1 - 0.1 * 9 / 10 = 0.91 of the ten digits' labeled loss leaves no pseudo-label at 0.95."""
    def edit(params: dict[str, Any]) -> None:
        params["data"]["max_images"] = 200
        params["semi"].update(label_smoothing=0.1, batch_size=32, labeled_batch_size=8)

    project = make_project(tmp_path, edit, text=False)
    prepare_dataset(_params(project).data, 0, project / "data/prepared", project / "data/cache")
    for folder, classes in (("models/finetune", 10), ("models/pretrain", 0)):
        (project / folder).mkdir(parents=True)
        (project / folder / "config.json").write_text(json.dumps({"num_classes": classes, "abstain": False}))
    done = _stage(project, "semi", "--data", "data/prepared", "--encoder", "models/pretrain", "--finetuned",
                  "models/finetune", "--out", "models/semi", "--metrics", "metrics/semi.json", "--plots",
                  "plots/semi", "--checkpoints", "checkpoints/semi")
    line = _refused(done, "semi", "semi.label_smoothing")
    assert line == ("semi: semi.label_smoothing=0.1: caps the confidence at 0.9100 over 10 classes, below "
                    "semi.threshold=0.95: no pseudo-label would pass; lower one of them")
    assert not (project / "checkpoints").exists() and not (project / "models/semi").exists()
    _assert_no_runs(project)


def test_rl_refuses_an_empty_rl_split_naming_rl_fraction(tmp_path: Path) -> None:
    from pipeline_lib.vision.rl import RLPaths, check_inputs

    data = params_from_dict({"data": {"max_images": 100, "rl_fraction": 0.0}}).data
    prepare_dataset(data, 0, tmp_path / "prepared", tmp_path / "cache")
    with pytest.raises(ConfigError, match=r"^data\.rl_fraction=0\.0: leaves the rl split in .* empty"):
        check_inputs(params_from_dict({}), RLPaths(tmp_path / "prepared", *(tmp_path / n for n in "compc")))


def test_text_stages_check_their_inputs(text_project: Path) -> None:
    from pipeline_lib.text import evaluate
    from pipeline_lib.text import pretrain as lm
    from pipeline_lib.text import rl as grpo
    from pipeline_lib.text.data import task_data

    data, task = text_project / "data/text/prepared", text_project / "data/text/task"
    train_tokens = json.loads((data / "meta.json").read_text())["num_tokens"]["train"]
    with pytest.raises(ConfigError, match=rf"^text_model\.seq_len=100000: the {train_tokens} training tokens are "
                                          r"too few for one window"):
        lm.check_inputs(params_from_dict({"text_model": {"seq_len": 100_000}}),
                        lm.LMPaths(data, *(text_project / n for n in "ompc")), "ar")
    with pytest.raises(ConfigError, match=r"^text_task\.train_size=6000: .*only 81 \(accepted: sizes adding up to"):
        task_data.check_inputs(params_from_dict({"text_task": {"digits": 1}}))
    model = text_project / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"objective": "mdm", "max_len": 16, "task": {}}))
    with pytest.raises(ConfigError, match=r"^text_evaluate\.prompt_tokens=16: must be < text_model\.seq_len=16"):
        evaluate.check_inputs(params_from_dict({}), data, {"mdm": model})
    with pytest.raises(ConfigError, match=r"^text_rl\.batch_size=32: is larger than the 16 rl prompts"):
        grpo.check_inputs(params_from_dict({"text_rl": {"batch_size": 32}}),
                          grpo.TextRLPaths(task, model, *(text_project / n for n in "ompc")), "mdm")
