"""The pipeline as a user runs it: `dvc repro` and `dvc exp run` in a temporary git repo copy of the project.

The toy project is reproduced once (`toy_project`, shared with every test that reads it); the tests that run
more commands in it work on copies of their own (`toy_clone`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import mlflow
import mlflow.pyfunc
import numpy as np
import pytest
import yaml

from pipeline_lib.text.serving import LanguageModel, SamplerSettings
from pipeline_lib.vision.data.store import prepared_digest


@pytest.fixture(autouse=True)
def default_tracking_uri() -> Iterator[None]:
    """The checks point MLflow at a project's store, which also sets MLFLOW_TRACKING_URI for the commands started
    after them: each test ends with neither, so that no later command logs into another copy's store."""
    yield
    mlflow.set_tracking_uri(None)


def _run(repo: Path, *command: str) -> str:
    """Run a command in `repo`, as a user does: the stages log to the project's own store (mlflow.db there)."""
    env = {name: value for name, value in os.environ.items() if name != "MLFLOW_TRACKING_URI"}
    done = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def _labeled_count(repo: Path) -> int:
    return json.loads((repo / "data/prepared/labeled/meta.json").read_text())["num_images"]


def _fetch_run(repo: Path) -> str:
    return json.loads((repo / "data/prepared/run.json").read_text())["run_id"]


def test_repro_fills_the_default_store_and_every_metric(toy_project: Path) -> None:
    repo = toy_project
    for split in ("unlabeled", "labeled", "rl", "test"):
        assert (repo / "data/prepared" / split / "meta.json").is_file()
    assert (repo / "mlflow.db").is_file() and (repo / "mlartifacts").is_dir()  # default store at DVC_ROOT
    assert _labeled_count(repo) == 16  # 10% of the 160 training images left after the 20% test split
    _check_git_dirty(repo, expected="false")  # a dvc repro of a committed project is clean in every run
    shown = _run(repo, "dvc", "metrics", "show")
    for key in ("ssl.top1", "scratch.top1", "gain.top1", "encoder.knn_top1", "encoder.linear_probe_top1",
                "post_trained.reward_greedy", "baselines.bayes_reference.reward_greedy", "metrics/text/ngram.json",
                "rl_ar.accuracy", "scratch_mdm.pass_at_16", "scratch_mdm.maj_at_16", "gain.rl_mdm_over_sft"):
        assert key in shown, key


def test_pretrain_outputs(toy_project: Path) -> None:
    _check_pretrain_outputs(toy_project, fetch_run=_fetch_run(toy_project))


def test_finetune_and_evaluate_outputs(toy_project: Path) -> None:
    _check_finetune_and_evaluate(toy_project)


def test_semi_outputs(toy_project: Path) -> None:
    """The semi stage's classifier: registered as started from the finetuned version, scored by evaluate."""
    repo = toy_project
    report = json.loads((repo / "metrics/semi.json").read_text())
    assert report["method"] == "fixmatch" and report["steps"] == 40 and 0 <= report["mask_rate"] <= 1
    assert json.loads((repo / "models/semi/config.json").read_text())["semi"] == "fixmatch"
    client = mlflow.MlflowClient(f"sqlite:///{repo}/mlflow.db")
    record = json.loads((repo / "models/semi/run.json").read_text())
    finetuned = json.loads((repo / "models/finetune/run.json").read_text())
    version = client.get_model_version("ssl-pipeline-classifier", str(record["model_version"]))
    assert int(version.version) == finetuned["model_version"] + 1
    assert version.tags["started_from"] == f"models:/ssl-pipeline-classifier/{finetuned['model_version']}"
    assert version.tags["finetuned.model_version"] == str(finetuned["model_version"])
    assert version.tags["upstream.finetune.run_id"] == finetuned["run_id"]
    summary = json.loads((repo / "metrics/evaluate.json").read_text())
    assert summary["gain"]["semi_vs_ssl"] == summary["semi"]["top1"] - summary["ssl"]["top1"]
    assert client.get_run(record["run_id"]).data.metrics["test.top1"] == summary["semi"]["top1"]


def test_rl_outputs(toy_project: Path) -> None:
    _check_rl(toy_project)


def test_text_track_outputs(toy_project: Path) -> None:
    _check_text(toy_project)


def test_text_task_outputs(toy_project: Path) -> None:
    _check_text_tasks(toy_project)


def test_registry(toy_project: Path) -> None:
    _check_registry(toy_project)


def test_task_gate(toy_clone: Path) -> None:
    _check_task_gate(toy_clone)


def test_noop_then_forced_stages_stay_clean(toy_clone: Path) -> None:
    repo, first_run = toy_clone, _fetch_run(toy_clone)
    second = _run(repo, "dvc", "repro")
    assert "didn't change" in second or "up to date" in second
    assert _fetch_run(repo) == first_run  # nothing reran
    assert "up to date" in _run(repo, "dvc", "status")

    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-q", "-m", "fetch")  # dvc.lock, metrics and plots committed, as on a clone
    before = _run_ids(repo)
    # Rerun stages whose committed metrics DVC deletes and rewrites (their timings change): still clean.
    _run(repo, "dvc", "repro", "--force", "--single-item", "finetune_scratch", "evaluate")
    assert _check_git_dirty(repo, expected="false", exclude=before) == {"finetune_scratch", "evaluate"}


def test_grpo_without_enough_signal_passes_the_sft_model_through(toy_clone: Path) -> None:
    """Below text_rl.min_signal the stage trains nothing: the SFT weights, registered as the GRPO version."""
    repo = toy_clone
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["text_rl"]["min_signal"] = 1.0  # every probe group would need unequal rewards
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    log = _run(repo, "dvc", "repro", "--single-item", "text_rl@ar")
    assert "below text_rl.min_signal=1.0; the SFT weights pass through" in log, log
    metrics = json.loads((repo / "metrics/text/rl_ar.json").read_text())
    assert metrics["trained"] is False and metrics["steps"] == 0
    assert metrics["probe"]["frac_reward_zero_std"] > 0.0  # it was below the bar, not at it
    weights = [(repo / f"models/text/{name}/model.safetensors").read_bytes() for name in ("sft_ar", "rl_ar")]
    assert weights[0] == weights[1]
    assert (repo / "plots/text/rl_ar/reward.csv").read_text().count("\n") == 1  # the header alone
    rl, sft = (json.loads((repo / f"models/text/{name}/run.json").read_text()) for name in ("rl_ar", "sft_ar"))
    version = mlflow.MlflowClient(f"sqlite:///{repo}/mlflow.db").get_model_version(rl["model_name"],
                                                                                     str(rl["model_version"]))
    assert version.tags["stage"] == "text_rl_ar" and version.tags["sft.model_version"] == str(sft["model_version"])


def test_experiment_with_a_param_change(toy_clone: Path) -> None:
    repo = toy_clone
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-q", "-m", "fetch")  # dvc.lock, metrics and plots committed, as on a clone
    before = _run_ids(repo)
    pretrain_lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["pretrain"]
    # Why the encoder is not retrained: `dvc status` names fetch alone (its params), and what pretrain depends on
    # of fetch's out, the unlabeled split, comes out byte-identical, as nothing labeled is recorded in it.
    params_file = repo / "params.yaml"
    committed = params_file.read_text()
    params_file.write_text(committed.replace("label_fraction: 0.1", "label_fraction: 0.2"))
    status = json.loads(_run(repo, "dvc", "status", "--json"))
    assert set(status) == {"fetch"} and "data.label_fraction" in json.dumps(status["fetch"]), status
    params_file.write_text(committed)
    log = _run(repo, "dvc", "exp", "run", "-S", "data.label_fraction=0.2")
    assert "Stage 'pretrain' didn't change, skipping" in log, log
    assert yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["pretrain"] == pretrain_lock
    assert "fetch" in _check_git_dirty(repo, expected="true", exclude=before)  # params.yaml differs
    assert _labeled_count(repo) == 32
    assert yaml.safe_load((repo / "params.yaml").read_text())["data"]["label_fraction"] == 0.2
    diffs = json.loads(_run(repo, "dvc", "metrics", "diff", "--json"))
    diff = diffs["metrics/evaluate.json"]
    assert diff["labels.labeled_images"] == {"old": 16, "new": 32, "diff": 16}
    assert diff["labels.label_fraction"]["new"] == 0.2
    for stage in ("finetune", "finetune_scratch"):  # both retrained: 20 epochs of 8 images a step, twice the labels
        assert diffs[f"metrics/{stage}.json"]["steps"] == {"old": 40, "new": 80, "diff": 40}

    client = mlflow.MlflowClient(f"sqlite:///{repo}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("ssl-pipeline").experiment_id],
                              filter_string="attributes.run_name = 'fetch'", order_by=["attributes.start_time ASC"])
    assert len(runs) == 2
    assert "dvc.exp_name" not in runs[0].data.tags
    assert runs[1].data.tags["dvc.exp_name"]  # DVC names the experiment; the run carries the name
    assert runs[1].data.params["data.label_fraction"] == "0.2"
    assert runs[0].data.tags["git.commit"] == _run(repo, "git", "rev-parse", "HEAD~1").strip()


def _run_ids(repo: Path) -> set[str]:
    client = mlflow.MlflowClient(f"sqlite:///{repo}/mlflow.db")
    experiment = client.get_experiment_by_name("ssl-pipeline").experiment_id
    return {run.info.run_id for run in client.search_runs([experiment])}


def _check_git_dirty(repo: Path, *, expected: str, exclude: set[str] = frozenset()) -> set[str]:
    """Every run but `exclude` is tagged git.dirty=`expected`; returns the names of those runs."""
    client = mlflow.MlflowClient(f"sqlite:///{repo}/mlflow.db")
    runs = [run for run in client.search_runs([client.get_experiment_by_name("ssl-pipeline").experiment_id])
            if run.info.run_id not in exclude]
    assert runs
    for run in runs:
        assert run.data.tags["git.dirty"] == expected, (run.info.run_name, run.data.tags.get("git.dirty_paths"))
        assert ("git.dirty_paths" in run.data.tags) == (expected == "true")
    return {run.info.run_name for run in runs}


REGISTERED = {  # name -> (role, objective) of every version
    "ssl-pipeline-encoder": ("encoder", None), "ssl-pipeline-classifier": ("classifier", None),
    "ssl-pipeline-lm-ar": ("language-model", "ar"), "ssl-pipeline-lm-mdm": ("language-model", "mdm"),
    "ssl-pipeline-task-lm-ar": ("task-model", "ar"), "ssl-pipeline-task-lm-mdm": ("task-model", "mdm"),
}


def _check_registry(repo: Path) -> None:
    """One kind of model per registered name, each described; the ar task model's challenger is the GRPO model
    and answers exactly like its folder."""
    client = mlflow.MlflowClient(f"sqlite:///{repo}/mlflow.db")
    models = {model.name: model for model in client.search_registered_models()}
    assert set(models) == set(REGISTERED)
    for name, (role, objective) in REGISTERED.items():
        assert "Every version is registered by" in models[name].description or "Versions come from" in (
            models[name].description)
        assert f"models:/{name}@" in models[name].description  # how to load it
        for version in client.search_model_versions(f"name = '{name}'"):
            assert version.tags["role"] == role and version.tags.get("objective") == objective, (name, version.tags)
            headline, started = version.description.split("\n\nStarted from: ")
            assert headline and "replaces this line" not in headline, (name, headline)  # evaluated
            assert started.startswith("models:/" if role in ("classifier", "task-model") else "fresh weights")
    sft, rl = (json.loads((repo / f"models/text/{kind}_ar/run.json").read_text()) for kind in ("sft", "rl"))
    challenger = client.get_model_version_by_alias("ssl-pipeline-task-lm-ar", "challenger")
    assert int(challenger.version) == rl["model_version"] == sft["model_version"] + 1
    assert challenger.tags["started_from"] == f"models:/ssl-pipeline-task-lm-ar/{sft['model_version']}"
    task = json.loads((repo / "metrics/text/task.json").read_text())
    assert f"test exact match {task['rl_ar']['accuracy']:.4f}" in challenger.description
    assert client.get_run(rl["run_id"]).data.metrics["test.accuracy"] == task["rl_ar"]["accuracy"]
    mlflow.set_tracking_uri(f"sqlite:///{repo}/mlflow.db")
    prompts = [json.loads(line)["prompt"] for line in (repo / "data/text/task/test.jsonl").open()]
    answers = mlflow.pyfunc.load_model("models:/ssl-pipeline-task-lm-ar@challenger").predict(prompts)
    local = LanguageModel.from_folder(repo / "models/text/rl_ar")
    assert answers == [local.generate(prompt, SamplerSettings(max_new_tokens=6, temperature=0.0))[0]
                       for prompt in prompts]


def _check_task_gate(repo: Path) -> None:
    """The gate promotes the ar task model's first challenger on its test exact match, then leaves it."""
    first = _run(repo, sys.executable, "-m", "pipeline_lib.promote", "--model", "task_ar")
    version = json.loads((repo / "models/text/rl_ar/run.json").read_text())["model_version"]
    assert f"ssl-pipeline-task-lm-ar: promoted v{version} to champion (no champion yet" in first
    assert "test.accuracy=" in first
    assert "unchanged" in _run(repo, sys.executable, "-m", "pipeline_lib.promote", "--model", "task_ar")


def test_switch_source_with_exp_run(toy_clone: Path, tmp_path: Path) -> None:
    from PIL import Image

    repo = toy_clone
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-q", "-m", "reproduced")
    for name, value in (("bright", 220), ("dark", 30)):
        (tmp_path / "pets" / name).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (6, 6), (value, i * 10, 0)).save(tmp_path / "pets" / name / f"{i}.png")
    _run(repo, "dvc", "exp", "run", "fetch", "-S", "data.source=imagefolder", "-S", f"data.path={tmp_path / 'pets'}")
    meta = json.loads((repo / "data/prepared/test/meta.json").read_text())
    assert meta["source"] == "imagefolder" and meta["class_names"] == ["bright", "dark"]
    assert meta["shape"][1:] == [6, 6, 3]


def _check_finetune_and_evaluate(repo: Path) -> None:
    """Both classifiers, the evaluate metrics and plots, and the registered classifier with its lineage."""
    for name in ("models/finetune/classifier.safetensors", "models/finetune_scratch/classifier.safetensors",
                 "plots/evaluate/confusion.csv", "plots/evaluate/confusion.png", "plots/evaluate/reliability.png"):
        assert (repo / name).is_file(), name
    summary = json.loads((repo / "metrics/evaluate.json").read_text())
    assert summary["gain"]["top1"] == summary["ssl"]["top1"] - summary["scratch"]["top1"]
    uri = f"sqlite:///{repo}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    record = json.loads((repo / "models/finetune/run.json").read_text())
    version = client.get_model_version("ssl-pipeline-classifier", str(record["model_version"]))
    encoder = json.loads((repo / "models/pretrain/run.json").read_text())
    assert version.tags["encoder.model_version"] == str(encoder["model_version"])
    assert version.tags["upstream.pretrain.run_id"] == encoder["run_id"]
    # Each run names the data it read: the classifier every split, the encoder the unlabeled split alone.
    assert version.tags["input.data.sha256"] == prepared_digest(repo / "data/prepared")
    assert client.get_run(encoder["run_id"]).data.tags["input.data.sha256"] == prepared_digest(
        repo / "data/prepared", splits=("unlabeled",))
    scratch = client.get_run(json.loads((repo / "models/finetune_scratch/run.json").read_text())["run_id"])
    assert scratch.info.run_name == "finetune_scratch" and scratch.data.tags["init"] == "scratch"
    assert scratch.data.metrics["test.top1"] == summary["scratch"]["top1"]

    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"models:/ssl-pipeline-classifier/{record['model_version']}")
    images = np.load(repo / "data/prepared/test/images.npy")
    probabilities = model.predict(images)
    assert probabilities.shape == (len(images), 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert np.mean(probabilities.argmax(axis=1) == np.load(repo / "data/prepared/test/labels.npy")) == (
        summary["ssl"]["top1"])


def _check_rl(repo: Path) -> None:
    """The post-trained classifier is the newest challenger, traced to the semi stage's version, with an abstain
    column; the report holds before/after and the baselines."""
    report = json.loads((repo / "metrics/rl.json").read_text())
    assert set(report["baselines"]) == {"bayes_reference", "expected_reward", "cross_entropy_bayes"}
    assert (repo / "plots/rl/risk_coverage.csv").is_file() and (repo / "plots/rl/risk_coverage.png").is_file()
    uri = f"sqlite:///{repo}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    record = json.loads((repo / "models/rl/run.json").read_text())
    semi = json.loads((repo / "models/semi/run.json").read_text())
    version = client.get_model_version_by_alias("ssl-pipeline-classifier", "challenger")
    assert int(version.version) == record["model_version"] == semi["model_version"] + 1
    assert version.tags["classifier.model_version"] == str(semi["model_version"])
    assert version.tags["upstream.semi.run_id"] == semi["run_id"]
    assert version.tags["started_from"] == f"models:/ssl-pipeline-classifier/{semi['model_version']}"
    run = client.get_run(record["run_id"])
    for key in ("reward", "reward_std", "frac_reward_zero_std", "kl", "entropy", "clip_ratio", "grad_norm", "lr"):
        assert key in run.data.metrics, key
    assert run.data.metrics["post_trained.reward_greedy"] == report["post_trained"]["reward_greedy"]
    mlflow.set_tracking_uri(uri)
    images = np.load(repo / "data/prepared/test/images.npy")
    probabilities = mlflow.pyfunc.load_model("models:/ssl-pipeline-classifier@challenger").predict(images)
    assert probabilities.shape == (len(images), 11)  # ten classes, then abstain
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def _check_pretrain_outputs(repo: Path, fetch_run: str) -> None:
    """The pretrain stage's outs, its MLflow run with lineage, and a loadable registered encoder."""
    for name in ("models/pretrain/encoder.safetensors", "models/pretrain/config.json",
                 "plots/pretrain/loss.csv", "plots/pretrain/examples.png"):
        assert (repo / name).is_file(), name
    metrics = json.loads((repo / "metrics/pretrain.json").read_text())
    params = yaml.safe_load((repo / "params.yaml").read_text())["pretrain"]
    assert metrics["steps"] == params["epochs"] * (160 // 32) == 40 and np.isfinite(metrics["loss"])
    record = json.loads((repo / "models/pretrain/run.json").read_text())
    uri = f"sqlite:///{repo}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    run = client.get_run(record["run_id"])
    assert run.info.run_name == "pretrain" and run.data.tags["upstream.fetch.run_id"] == fetch_run
    assert run.data.params["pretrain.method"] == "mae" and run.data.params["model.embed_dim"] == "32"
    # a mean over every log_every steps, and a checkpoint closes the window early: 2, 3, 4, 6, 8, 9, 10, ...
    logged = [step for step in range(1, 41) if 0 in (step % params["log_every"], step % params["checkpoint_every"])]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == logged
    version = client.get_model_version_by_alias("ssl-pipeline-encoder", "challenger")
    assert int(version.version) == record["model_version"] and version.run_id == run.info.run_id
    assert version.tags["input.data.sha256"] == run.data.tags["input.data.sha256"]

    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/ssl-pipeline-encoder@challenger")
    images = np.load(repo / "data/prepared/test/images.npy")[:3]
    features = model.predict(images)
    assert features.shape == (3, 32) and np.isfinite(features).all()


def _check_text(repo: Path) -> None:
    """The text track's prepared tokens and the n-gram baseline's validation bits per character."""
    meta = json.loads((repo / "data/text/prepared/meta.json").read_text())
    assert meta["origin"] == "pydoc_data.topics" and meta["num_tokens"]["val"] > 0
    assert 1.0 < json.loads((repo / "metrics/text/ngram.json").read_text())["bpc"] < 3.0
    summary = json.loads((repo / "metrics/text/evaluate.json").read_text())
    assert set(summary) == {"ngram", "ar", "mdm", "gain"}
    assert summary["ar"]["bpc"] > 0 and summary["mdm"]["bpc_bound"] > 0  # the masked model's figure is a bound
    assert summary["gain"]["ar_vs_ngram"] == 1 - summary["ar"]["bpc"] / summary["ngram"]["bpc"]
    client = mlflow.MlflowClient(f"sqlite:///{repo}/mlflow.db")
    run = client.get_run(json.loads((repo / "models/text/mdm/run.json").read_text())["run_id"])
    assert run.info.run_name == "text_pretrain_mdm" and run.data.tags["objective"] == "mdm"
    assert {"moe.max_violation", "moe.layer0.load.e3"} <= run.data.metrics.keys()  # the toy track's MoE
    ar_run = client.get_run(json.loads((repo / "models/text/ar/run.json").read_text())["run_id"])
    assert {"mtp1_accuracy", "mtp_loss"} <= ar_run.data.metrics.keys()  # and its multi-token prediction
    evaluated = client.search_runs([run.info.experiment_id], "attributes.run_name = 'text_evaluate'")[0]
    assert {a.path for a in client.list_artifacts(evaluated.info.run_id, "samples")} == {
        "samples/ar.txt", "samples/mdm.txt"}
    _check_language_models(repo, client)


def _check_text_tasks(repo: Path) -> None:
    """The task stages: disjoint splits, the six task models scored on test, GRPO's curves and samples in MLflow,
    and the SFT and GRPO models registered with lineage to the versions they started from."""
    splits = {name: [json.loads(line)["prompt"] for line in (repo / f"data/text/task/{name}.jsonl").open()]
              for name in ("train", "rl", "test")}
    assert [len(v) for v in splits.values()] == [40, 16, 16]
    assert len({prompt for prompts in splits.values() for prompt in prompts}) == 72  # no prompt in two splits
    summary = json.loads((repo / "metrics/text/task.json").read_text())
    for objective in ("ar", "mdm"):
        for kind in ("sft", "scratch", "rl"):
            metrics = summary[f"{kind}_{objective}"]
            ks = (1, 2, 4, 8, 16)
            assert {"accuracy", "format_rate", "sampled_format_rate", *(f"{m}_at_{k}" for m in ("pass", "maj")
                                                                        for k in ks)} <= set(metrics)
            assert 0 <= metrics["accuracy"] <= metrics["format_rate"] <= 1
            assert [metrics[f"pass_at_{k}"] for k in ks] == sorted(metrics[f"pass_at_{k}"] for k in ks)
            assert metrics["maj_at_1"] == pytest.approx(metrics["pass_at_1"])
        gain = summary["gain"]
        rl, sft = summary[f"rl_{objective}"], summary[f"sft_{objective}"]
        assert gain[f"rl_{objective}_over_sft"] == rl["accuracy"] - sft["accuracy"]
        assert f"sft_{objective}_over_scratch" in gain
    client = mlflow.MlflowClient(f"sqlite:///{repo}/mlflow.db")
    rl_run = client.get_run(json.loads((repo / "models/text/rl_mdm/run.json").read_text())["run_id"])
    history = {key: client.get_metric_history(rl_run.info.run_id, key) for key in (
        "reward", "reward_std", "frac_reward_zero_std", "kl", "entropy", "clip_ratio", "completion_length")}
    assert all(len(points) == 4 for points in history.values()), {k: len(v) for k, v in history.items()}
    assert client.list_artifacts(rl_run.info.run_id, "samples")[0].path == "samples/step_00000.txt"
    sft = json.loads((repo / "models/text/sft_mdm/run.json").read_text())
    pretrained = json.loads((repo / "models/text/mdm/run.json").read_text())
    sft_version = client.get_model_version("ssl-pipeline-task-lm-mdm", str(sft["model_version"]))
    assert sft_version.tags["stage"] == "text_sft_mdm" and sft_version.tags["objective"] == "mdm"
    assert sft_version.tags["pretrained.model_version"] == str(pretrained["model_version"])
    rl = json.loads((repo / "models/text/rl_mdm/run.json").read_text())
    rl_version = client.get_model_version("ssl-pipeline-task-lm-mdm", str(rl["model_version"]))
    assert rl_version.tags["stage"] == "text_rl_mdm"
    assert rl_version.tags["sft.model_version"] == str(sft["model_version"])
    assert json.loads((repo / "models/text/scratch_ar/run.json").read_text())["model_version"] is None  # measured only
    assert json.loads((repo / "models/text/rl_mdm/config.json").read_text())["moe"]["routed_experts"] == 4
    # The registered GRPO model answers like its folder: greedy completions, cut at the end of sequence.
    mlflow.set_tracking_uri(f"sqlite:///{repo}/mlflow.db")
    registered = mlflow.pyfunc.load_model(f"models:/ssl-pipeline-task-lm-mdm/{rl['model_version']}")
    answers = registered.predict(splits["test"][:3])
    local = LanguageModel.from_folder(repo / "models/text/rl_mdm")
    settings = SamplerSettings(max_new_tokens=6, block_length=3, temperature=0.0)  # two blocks, not the whole answer
    assert answers == [local.generate(prompt, settings)[0] for prompt in splits["test"][:3]]
    assert not any("<eos>" in answer for answer in answers)


def _check_language_models(repo: Path, client: mlflow.MlflowClient) -> None:
    """Each language model is a version of its objective's name, `ssl-pipeline-lm-<objective>`, that generates
    text through MLflow and through the command line."""
    versions = {}
    for objective in ("ar", "mdm"):
        record = json.loads((repo / f"models/text/{objective}/run.json").read_text())
        version = client.get_model_version(record["model_name"], str(record["model_version"]))
        assert record["model_name"] == f"ssl-pipeline-lm-{objective}" and version.run_id == record["run_id"]
        assert version.tags["objective"] == objective and version.tags["upstream.text_fetch.run_id"]
        assert client.get_model_version_by_alias(record["model_name"], "challenger").version == version.version
        versions[objective] = version.version
    # A registered version generates what its model folder generates, through MLflow and the command line.
    mlflow.set_tracking_uri(f"sqlite:///{repo}/mlflow.db")
    model = mlflow.pyfunc.load_model(f"models:/ssl-pipeline-lm-ar/{versions['ar']}")
    texts = model.predict(["The ", "A "], params={"max_new_tokens": 6, "seed": 1})
    local = LanguageModel.from_folder(repo / "models/text/ar")
    assert texts == [local.generate(prompt, SamplerSettings(max_new_tokens=6, seed=1))[0] for prompt in ("The ", "A ")]
    done = subprocess.run(["python", "-m", "pipeline_lib.text.serving", "models:/ssl-pipeline-lm-mdm@challenger",
                           "--prompt", "The ", "--max-new-tokens", "8", "--block-length", "4", "--steps", "4"],
                          cwd=repo, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{repo}/mlflow.db"})
    assert done.returncode == 0, done.stderr
    expected = LanguageModel.from_folder(repo / "models/text/mdm").generate(
        "The ", SamplerSettings(max_new_tokens=8, block_length=4, steps=4))[0]
    assert done.stdout == f"--- sample 0 ---\nThe {expected}\n"
