"""The rl stage: GRPO post-training of the finetuned classifier against the declared reward, with baselines.

Trains on the `rl` split only: GRPO from the finetuned classifier (the frozen reference; the core GRPO trainer
with the classifier policy, `vision.policy.ClassifierPolicy`), and with the same budget the exact expected-reward
objective and plain cross-entropy (the control for "RL only helped because it saw more labels", decided by the
Bayes rule afterwards). Reports on `test`, reference against post-trained: reward of greedy and of sampled actions,
accuracy, coverage and selective risk, NLL and ECE of the class distribution (renormalised without abstain), exact
KL to the reference, and the area under the risk-coverage curve; the Bayes rule on the reference's probabilities is
the bar to clear.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import entropy
from torch import Tensor, nn

from pipeline_lib.core import dist
from pipeline_lib.core.checkpoints import code_digest
from pipeline_lib.core.config import flatten, params_hash
from pipeline_lib.core.errors import ConfigError, DataError
from pipeline_lib.core.grpo import GRPOTrainer, expected_reward_loss
from pipeline_lib.core.outputs import staged_dir
from pipeline_lib.core.tracking import Tracker, upstream_model, write_json_atomic, write_run_record
from pipeline_lib.core.trainer import Batch, Trainer, check_batch_size
from pipeline_lib.vision.config import RewardParams, RLParams, VisionParams
from pipeline_lib.vision.data.store import Split, prepared_digest, read_meta, read_split
from pipeline_lib.vision.decisions import decision_report, risk_coverage
from pipeline_lib.vision.evaluate import predict_probabilities
from pipeline_lib.vision.metrics import classification_metrics
from pipeline_lib.vision.models.classifier import AbstainClassifier
from pipeline_lib.vision.models.factory import (
    CLASSIFIER_FILE,
    encoder_digest,
    load_network,
    read_network_config,
    save_network,
    saved_model_params,
)
from pipeline_lib.vision.models.preprocess import Preprocess
from pipeline_lib.vision.policy import ClassifierPolicy, class_kl, log_policy, train_heads_only
from pipeline_lib.vision.rewards import abstain_table, accuracy_table, bayes_actions, cost_table
from pipeline_lib.vision.trainer import ImageTrainer


@dataclass
class RLPaths:
    """Where the rl stage reads and writes (all from dvc.yaml)."""

    data: Path
    classifier: Path
    out: Path
    metrics: Path
    plots: Path
    checkpoints: Path

    def checkpoints_of(self, trainer: str) -> Path:
        """Each trainer of the stage (`TRAINERS`: GRPO and its two baselines) checkpoints in a folder of its own;
        GRPO's holds the run id the stage's MLflow run resumes."""
        return self.checkpoints / trainer


def reward_table(reward: RewardParams, num_classes: int) -> np.ndarray:
    """The declared reward as R[action, label]; a cost matrix given as a CSV path is read here."""
    if reward.type == "accuracy":
        return accuracy_table(num_classes)
    if reward.type == "abstain":
        return abstain_table(num_classes, correct=reward.correct, wrong=reward.wrong, abstain=reward.abstain)
    matrix: Any = reward.cost_matrix
    if isinstance(matrix, str):
        path = Path(matrix)
        if not path.is_file():
            raise ConfigError(f"rl.reward.cost_matrix={matrix!r}: no such CSV file")
        try:
            matrix = np.loadtxt(path, delimiter=",", ndmin=2)
        except ValueError as err:
            raise ConfigError(f"rl.reward.cost_matrix={reward.cost_matrix!r}: not a CSV of numbers ({err})") from err
    try:
        return cost_table(matrix, num_classes)
    except ValueError as err:  # its shape against the classifier's classes, or a value that is not finite
        detail = str(err).removeprefix("reward.cost_matrix: ")
        raise ConfigError(f"rl.reward.cost_matrix={reward.cost_matrix!r}: {detail}") from err


def grpo_trainer(model: nn.Module, cfg: RLParams, images: Any, preprocess: Preprocess, *, reference: nn.Module,
                 table: Tensor, device: torch.device, **kwargs: Any) -> GRPOTrainer[RLParams]:
    """GRPO of a classifier (`ClassifierPolicy`) against the reward table `table` (A, C), anchored to `reference`,
    the frozen finetuned classifier; `kwargs` are the base trainer's (the `rl` split's labels among them).

    The trainer feeds the policy images normalised by `preprocess`, the module a served model applies.
    """
    if kwargs.get("labels") is None:
        raise ValueError("GRPO needs the rl split's labels to score actions")
    if cfg.head_only:
        train_heads_only(model)
    policy = ClassifierPolicy(table.to(device, torch.float32), group_size=cfg.group_size, temperature=cfg.temperature)
    return GRPOTrainer(model, cfg, images, preprocess, policy=policy, reference=reference, device=device, **kwargs)


class BaselineTrainer(ImageTrainer[RLParams]):
    """A baseline trained like GRPO: on the same `rl` images and labels, as many optimizer steps on the same batches
    (`num_iterations` per batch), the model in eval mode, only the heads with `head_only`.

    Args (beyond the base trainer's): reference (the frozen finetuned classifier) and table (A, C) as `grpo_trainer`.
    """

    def __init__(self, model: nn.Module, cfg: RLParams, images: Any, preprocess: Preprocess, *, reference: nn.Module,
                 table: Tensor, **kwargs: Any) -> None:
        if cfg.head_only:
            train_heads_only(model)
        super().__init__(model, cfg, images, preprocess, **kwargs)
        if self.labels is None:
            raise ValueError(f"{self.stage} needs the rl split's labels")
        self.reference = reference.to(self.device).eval().requires_grad_(False)
        self.table = table.to(self.device, torch.float32)
        self.num_classes = self.table.shape[1]

    def updates_per_batch(self) -> int:
        return self.cfg.num_iterations

    def train_mode(self) -> None:
        self.model.eval()


class ExpectedRewardTrainer(BaselineTrainer):
    """Baseline: the exact expected reward sum_a pi(a|x) R[a, y], maximised directly with the same budget.

    With every action enumerable this is the objective GRPO estimates from G samples, without the sampling
    noise; the same KL weight keeps it near the reference (exact class KL instead of the k3 estimate).
    """

    stage = "rl_expected_reward"

    def compute_loss(self, batch: Batch) -> dict[str, Tensor]:
        cfg = self.cfg
        images = self.normalize(batch.inputs)
        logits = self.forward_model(images)
        log_probs = log_policy(logits, cfg.temperature)
        rewards = self.table[:, batch.labels].T  # (b, A): the reward of every action for each image
        loss = expected_reward_loss(log_probs, rewards)
        with torch.no_grad():
            reference = self.reference(images)
        kl = class_kl(logits, reference, cfg.temperature).mean()
        return {"loss": loss + cfg.beta * kl, "reward": -loss.detach(), "kl": kl.detach()}


class CrossEntropyTrainer(BaselineTrainer):
    """Control: plain cross-entropy on the same `rl` labels and budget (the Bayes rule decides afterwards).

    If RL only helps because it saw more labels, this matches it.
    """

    stage = "rl_cross_entropy"

    def compute_loss(self, batch: Batch) -> dict[str, Tensor]:
        assert batch.labels is not None
        logits = self.forward_model(self.normalize(batch.inputs))
        return {"loss": F.cross_entropy(logits[:, : self.num_classes].float(), batch.labels)}


# GRPO and its baselines, trained in this order with the same budget; cross_entropy trains the classifier as it is
# (no abstain action: the Bayes rule decides afterwards).
TRAINERS: dict[str, Callable[..., Trainer[RLParams]]] = {
    "grpo": grpo_trainer, "expected_reward": ExpectedRewardTrainer, "cross_entropy": CrossEntropyTrainer}


def logged_params(params: VisionParams) -> dict[str, Any]:
    """The flat params the rl stage declares in dvc.yaml, as MLflow logs them."""
    return {"seed": params.seed, "device": params.device, **flatten(params.rl, prefix="rl.")}


def fingerprint(params: VisionParams, paths: RLPaths) -> str:
    """Identifies an rl run for resuming: params, data, the classifier it starts from, library code."""
    return params_hash({**logged_params(params), "data": prepared_digest(paths.data),
                        "classifier": encoder_digest(paths.classifier), "code": code_digest()})


def with_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits) -> softmax(logits / temperature), row by row: the policy's action probabilities."""
    if temperature == 1.0:
        return probs
    scaled = np.log(np.clip(probs, 1e-300, None)) / temperature
    scaled = np.exp(scaled - scaled.max(axis=1, keepdims=True))
    return scaled / scaled.sum(axis=1, keepdims=True)


def class_view(probs: np.ndarray, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, A) action probabilities -> the class distribution renormalised without abstain, and the confidence
    that orders the risk-coverage curve: 1 - p(abstain) with abstain, else the top class probability."""
    class_probs = probs[:, :classes] / probs[:, :classes].sum(axis=1, keepdims=True)
    confidence = 1 - probs[:, classes] if probs.shape[1] > classes else class_probs.max(axis=1)
    return class_probs, confidence


def policy_report(probs: np.ndarray, reference: np.ndarray, test: Split, table: np.ndarray, *,
                  num_bins: int, class_names: list[str], actions: np.ndarray | None = None) -> dict[str, Any]:
    """A model's decisions and class probabilities on test. `actions` None: the policy's greedy actions."""
    labels = np.asarray(test.labels)
    class_probs, confidence = class_view(probs, len(class_names))
    greedy = probs.argmax(axis=1) if actions is None else actions
    report = decision_report(greedy, labels, table, probs if actions is None else None)
    metrics = classification_metrics(class_probs, labels, class_names, num_bins=num_bins)
    _, _, aurc = risk_coverage(confidence, class_probs.argmax(axis=1) == labels)
    return {**report, "class_top1": metrics["top1"], "nll": metrics["nll"], "ece": metrics["ece"],
            "kl_to_reference": float(entropy(class_probs, reference, axis=1).mean()), "aurc": aurc}


def check_splits(metas: dict[str, dict[str, Any]], root: Path) -> None:
    """GRPO trains on the rl split and reports on test (`metas`: their meta.json): both need labeled images.

    Raises:
        ConfigError: a split is empty (naming the data key that sized it); DataError: a split has no labels.
    """
    for name, meta in metas.items():
        if "labels.npy" not in meta["sha256"]:
            raise DataError(f"{root}/{name} has no labels: the rl stage needs a labeled data.source")
        if meta["num_images"] == 0:
            key = "data.rl_fraction" if name == "rl" else "data.test_fraction"
            raise ConfigError(f"{key}={meta.get(key.removeprefix('data.'))!r}: leaves the {name} split in {root} "
                              "empty, and the rl stage needs it (accepted: a fraction large enough for at least one "
                              "image, e.g. 0.1)")


def check_classifier(config: dict[str, Any], folder: Path) -> None:
    """GRPO starts from a finetuned classifier (its config.json): class logits, no abstain action yet."""
    if not config.get("num_classes") or config.get("abstain"):
        raise ValueError(f"{folder} is not a finetuned classifier (config.json num_classes, no abstain)")


def check_inputs(params: VisionParams, paths: RLPaths) -> None:
    """The params that only the prepared data and the finetuned classifier decide, checked by the stage before
    its MLflow run from meta.json and config.json: the rl and test splits hold labeled images
    (`data.rl_fraction`), `rl.reward.cost_matrix` is C x C for the classifier's C classes (`reward_table`), and
    `rl.batch_size` fits the rl split (and the processes).

    Raises:
        ConfigError: naming the key; DataError, FileNotFoundError, ValueError: missing or wrong inputs.
    """
    metas = {name: read_meta(paths.data, name) for name in ("rl", "test")}
    check_splits(metas, paths.data)
    config = read_network_config(paths.classifier)
    check_classifier(config, paths.classifier)
    reward_table(params.rl.reward, len(config["class_names"]))
    check_batch_size(params.rl, metas["rl"]["num_images"], "rl images")


def run_rl(params: VisionParams, paths: RLPaths, tracker: Tracker, device: torch.device) -> dict[str, Any]:
    """Post-train with GRPO and train both baselines (resuming matching checkpoints); rank 0 reports on test
    and writes every out."""
    cfg = params.rl
    rl, test = read_split(paths.data, "rl"), read_split(paths.data, "test")
    check_splits({"rl": rl.meta, "test": test.meta}, paths.data)
    reference, preprocess, config = load_network(paths.classifier)
    check_classifier(config, paths.classifier)
    class_names = list(config["class_names"])
    table = reward_table(cfg.reward, len(class_names))  # shape errors before any training
    abstains = table.shape[0] > len(class_names)
    images, labels = rl.images, np.asarray(rl.labels)
    runs: dict[str, tuple[nn.Module, float]] = {}
    for name, make in TRAINERS.items():
        policy = copy.deepcopy(reference)
        if abstains and name != "cross_entropy":
            policy = AbstainClassifier(policy)
        tracked = tracker if name == "grpo" else Tracker()  # only GRPO's curves go to the stage's run
        trainer = make(policy, cfg, images, preprocess, reference=copy.deepcopy(reference),
                       table=torch.as_tensor(table), labels=labels, device=device, seed=params.seed,
                       checkpoint_dir=paths.checkpoints_of(name), tracker=tracked,
                       fingerprint=fingerprint(params, paths))
        if dist.is_main() and name == "grpo":
            print(f"rl: GRPO on {len(rl)} rl images, reward {cfg.reward.type}, G={cfg.group_size}, "
                  f"{trainer.total_steps} steps, lr {trainer.lr:.2e}, {dist.world_size()} process(es) on {device}")
        started = time.perf_counter()
        trainer.fit()
        runs[name] = (trainer.model, time.perf_counter() - started)
    if not dist.is_main():
        return {}
    summary, rows = report(params, test, table, class_names, reference, preprocess, runs, device)
    write_outputs(params, paths, runs["grpo"][0], preprocess, summary, rows, tracker, class_names=class_names)
    return summary


def report(params: VisionParams, test: Split, table: np.ndarray, class_names: list[str], reference: nn.Module,
           preprocess: nn.Module, runs: dict[str, Any], device: torch.device,
           ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """metrics/rl.json (reference and post-trained on test, the three baselines, gains, budgets) and the
    risk-coverage rows."""
    cfg, bins = params.rl, params.evaluate.calibration_bins
    images, extra = test.images, table.shape[0] - len(class_names)
    ref_probs = predict_probabilities(reference, preprocess, images, device=device)
    ref_policy = np.pad(with_temperature(ref_probs, cfg.temperature), ((0, 0), (0, extra)))  # never abstains
    options = {"num_bins": bins, "class_names": class_names}
    ref_bayes = bayes_actions(torch.as_tensor(ref_probs), torch.as_tensor(table)).numpy()
    reports = {"reference": policy_report(ref_policy, ref_probs, test, table, **options),
               "bayes_reference": policy_report(ref_policy, ref_probs, test, table, actions=ref_bayes, **options)}
    policies = {name: with_temperature(predict_probabilities(runs[name][0], preprocess, images, device=device),
                                       cfg.temperature) for name in ("grpo", "expected_reward")}
    for name, probs in policies.items():
        reports[name] = policy_report(probs, ref_probs, test, table, **options)
    ce_probs = predict_probabilities(runs["cross_entropy"][0], preprocess, images, device=device)
    ce_actions = bayes_actions(torch.as_tensor(ce_probs), torch.as_tensor(table)).numpy()
    reports["cross_entropy_bayes"] = policy_report(np.pad(ce_probs, ((0, 0), (0, extra))), ref_probs, test, table,
                                                   actions=ce_actions, **options)
    post, before = reports.pop("grpo"), reports.pop("reference")
    rows = curves(ref_policy, policies["grpo"], np.asarray(test.labels), len(class_names))
    return {
        "reward": {"type": cfg.reward.type},
        "reference": before,
        "post_trained": post,
        "baselines": reports,
        "gain": {"reward_greedy": post["reward_greedy"] - before["reward_greedy"],
                 "reward_greedy_over_bayes": post["reward_greedy"] - reports["bayes_reference"]["reward_greedy"],
                 "reward_greedy_over_cross_entropy": post["reward_greedy"]
                 - reports["cross_entropy_bayes"]["reward_greedy"]},
        "train_seconds": {name: round(seconds, 2) for name, (_, seconds) in runs.items()},
        "test_images": len(test),
    }, rows


def curves(reference: np.ndarray, post: np.ndarray, labels: np.ndarray, classes: int) -> list[dict[str, Any]]:
    """Risk-coverage rows (model, coverage, risk) of the reference and the post-trained policy on test."""
    rows = []
    for name, probs in (("reference", reference), ("post_trained", post)):
        class_probs, confidence = class_view(probs, classes)
        coverage, risk, _ = risk_coverage(confidence, class_probs.argmax(axis=1) == labels)
        rows += [{"model": name, "coverage": c, "risk": r} for c, r in zip(coverage, risk, strict=True)]
    return rows


def write_outputs(params: VisionParams, paths: RLPaths, model: nn.Module, preprocess: nn.Module,
                  summary: dict[str, Any], rows: list[dict[str, Any]], tracker: Tracker, *,
                  class_names: list[str]) -> None:
    """Post-trained classifier + config, metrics, the before/after table; registered as a new classifier
    version (alias challenger) with lineage to the finetuned version."""
    import json

    import matplotlib.pyplot as plt

    from pipeline_lib.core.outputs import write_csv
    from pipeline_lib.core.registry import model_uri, register_model
    from pipeline_lib.vision.serving import CLASSIFIER, ClassifierModel, classifier_description

    finetuned = upstream_model(paths.classifier, encoder_digest(paths.classifier))
    source = json.loads((paths.classifier / "config.json").read_text())
    with staged_dir(paths.out) as out:  # the finetuned classifier's own (resolved) architecture
        save_network(model, preprocess, saved_model_params(source), out, in_chans=int(source["model"]["in_chans"]),
                     weights=CLASSIFIER_FILE, class_names=class_names, reward=params.rl.reward.type,
                     finetuned=finetuned,
                     data_digest=prepared_digest(paths.data))
    with staged_dir(paths.plots) as plots:
        write_csv(plots / "risk_coverage.csv", rows, ["model", "coverage", "risk"])
        figure = risk_coverage_figure(rows)
        figure.savefig(plots / "risk_coverage.png", dpi=100)
    tracker.log_metrics(flat_metrics(summary))
    tracker.log_dict(summary, "rl_report.json")
    tracker.log_figure(figure, "risk_coverage.png")
    plt.close(figure)
    tracker.flush()
    version = None
    if tracker.run_id is not None:
        example = np.asarray(read_split(paths.data, "test").images[:2])
        name, post = params.tracking.classifier_model, summary["post_trained"]
        headline = (f"test reward (greedy) {post['reward_greedy']:.4f}, accuracy {post['accuracy']:.4f}, coverage "
                    f"{post['coverage']:.4f} on {summary['test_images']} test images, reward "
                    f"{params.rl.reward.type} (rl stage: GRPO)")
        version = register_model(ClassifierModel(), paths.out, name=name, kind=CLASSIFIER, artifact_name="classifier",
                                 input_example=example, tags=tracker.lineage, description=classifier_description(name),
                                 headline=headline,
                                 started_from=model_uri(finetuned["model_name"], finetuned["model_version"]))
    write_run_record(paths.out / "run.json", tracker, model_name=params.tracking.classifier_model,
                     model_version=version)
    write_json_atomic(paths.metrics, summary)


def risk_coverage_figure(rows: list[dict[str, Any]]) -> Any:
    """Selective risk against coverage, reference and post-trained (answering the most confident first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(4.5, 3.5))
    for name in dict.fromkeys(row["model"] for row in rows):
        points = [(row["coverage"], row["risk"]) for row in rows if row["model"] == name]
        axis.plot(*zip(*points, strict=True), label=name)
    axis.set(xlabel="coverage", ylabel="selective risk", xlim=(0, 1), title="risk-coverage on test")
    axis.legend()
    figure.tight_layout()
    return figure


def flat_metrics(summary: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of the report as dotted MLflow metric names (`post_trained.reward_greedy`, ...)."""
    flat: dict[str, float] = {}
    for key, value in summary.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_metrics(value, prefix=f"{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat
