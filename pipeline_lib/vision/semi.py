"""The semi stage: the unlabeled images at finetune time too, after the finetune stage.

Two methods, chosen by `semi.method` (`SEMI_METHODS`), train one classifier on both splits with the finetune
stage's machinery (the base trainer, layer-wise lr decay, crops on the device, checkpoints and bit-exact resume):

- `fixmatch` (Sohn et al. 2020): the student's own prediction on a weak view (the recipe's crops) of each
  unlabeled image is the hard target of a strong view (`StrongAugment`: a random affine map and cutout) where its
  confidence reaches `semi.threshold`;
- `distill` (SimCLRv2's third step, Chen et al. 2020): the frozen finetuned classifier (the teacher) gives soft
  targets at `semi.temperature` for every unlabeled image, as the student sees it.

Both add the labeled cross-entropy of `labeled_batch_size` labeled images a step. An epoch is a pass over the
unlabeled split (`batch_size` images a step). The labeled images of a step are drawn, like every random choice
of the step, from the step's generator for the global batch, so the process count and a resume change nothing.
`none` copies models/finetune to models/semi, so the stages after it read one folder whatever the method.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline_lib.core import dist
from pipeline_lib.core.checkpoints import code_digest
from pipeline_lib.core.config import flatten, params_hash
from pipeline_lib.core.errors import ConfigError, DataError
from pipeline_lib.core.outputs import staged_dir
from pipeline_lib.core.tracking import Tracker, upstream_model, write_json_atomic, write_run_record
from pipeline_lib.core.trainer import Batch, check_batch_size
from pipeline_lib.vision.config import SemiParams, VisionParams
from pipeline_lib.vision.data.augment import AugmentConfig, StrongAugment, StrongConfig
from pipeline_lib.vision.data.store import prepared_digest, read_meta, read_split
from pipeline_lib.vision.finetune import layer_decay_groups
from pipeline_lib.vision.losses import distillation_loss, fixmatch_loss
from pipeline_lib.vision.models.classifier import attach_head
from pipeline_lib.vision.models.factory import (
    CLASSIFIER_FILE,
    CONFIG_FILE,
    encoder_digest,
    load_network,
    read_network_config,
    save_network,
    saved_model_params,
)
from pipeline_lib.vision.models.preprocess import Preprocess
from pipeline_lib.vision.trainer import ImageTrainer


class SemiTrainer(ImageTrainer[SemiParams]):
    """The labeled cross-entropy plus a method's loss on the unlabeled images (`unlabeled_loss`).

    Args (beyond the base trainer's, whose `inputs` are the unlabeled images):
        labeled: (N, H, W, C) uint8 labeled images and their (N,) labels.
    """

    stage = "semi"

    def __init__(self, *args: Any, labeled: tuple[np.ndarray, np.ndarray], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.labeled_images, self.labeled_labels = labeled
        cfg = self.cfg
        self.strong = StrongAugment(StrongConfig(
            rotation=cfg.strong_rotation, shift=cfg.strong_shift, scale=(cfg.strong_scale_min, cfg.strong_scale_max),
            shear=cfg.strong_shear, cutout=(cfg.cutout_min, cfg.cutout_max)), self.preprocess.img_size)

    def augment_config(self) -> AugmentConfig | None:
        """The weak view: the finetuning recipe's crops, no flips, no colour."""
        if self.cfg.crop_scale_min == 1.0:
            return None
        return AugmentConfig(crop_scale=(self.cfg.crop_scale_min, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0,
                             blur_p=0.0)

    def param_groups(self) -> list[dict[str, Any]]:
        return layer_decay_groups(self.model, self.cfg.weight_decay, self.cfg.layer_decay)

    def weak(self, images: Tensor, batch: Batch, rows: slice, size: int) -> Tensor:
        """A weak view of this process's `rows` of a global batch of `size` images."""
        if self.augment is None:
            return images
        params = self.augment.sample(size, batch.generator, torch.device("cpu"))
        return self.augment.apply(images, {name: value[rows].to(self.device) for name, value in params.items()})

    def labeled_batch(self, batch: Batch) -> tuple[Tensor, Tensor, slice]:
        """This process's labeled images of the micro-batch ((b, C, S, S) in [0, 1]) and labels, and their rows.

        The step's `labeled_batch_size` images are the first of a permutation drawn from the step's generator;
        micro-batch m holds the m-th share of them, and each process every `world`-th row of that share.
        """
        cfg, world = self.cfg, self.world
        micro = batch.rows.start // self.micro_global  # which micro-batch of the step this is
        share = cfg.labeled_batch_size // cfg.accumulation_steps
        chosen = torch.randperm(len(self.labeled_images), generator=batch.generator)[: cfg.labeled_batch_size]
        rows = slice(micro * share + self.rank, (micro + 1) * share, world)
        index = chosen[rows].numpy()
        pixels = torch.from_numpy(self.labeled_images[index]).to(self.device, non_blocking=True)
        labels = torch.from_numpy(self.labeled_labels[index]).to(self.device)
        return self.preprocess.to_unit(pixels), labels, rows

    def compute_loss(self, batch: Batch) -> dict[str, Tensor]:
        labeled, labels, rows = self.labeled_batch(batch)
        labeled = self.weak(labeled, batch, rows, self.cfg.labeled_batch_size)
        weak = self.weak(batch.inputs, batch, batch.rows, batch.global_size)
        view = self.student_view(weak, batch)
        # One forward pass with gradients for both splits: DDP expects one per backward.
        logits = self.forward_model(self.normalize(torch.cat([labeled, view])))  # (b_l + b_u, K)
        labeled_logits, unlabeled_logits = logits[: len(labeled)], logits[len(labeled) :]
        supervised = F.cross_entropy(labeled_logits.float(), labels, label_smoothing=self.cfg.label_smoothing)
        terms = self.unlabeled_loss(unlabeled_logits, weak)
        loss = supervised + self.cfg.unlabeled_weight * terms["unlabeled_loss"]
        return {"loss": loss, "labeled_loss": supervised.detach(), **terms,
                "train_accuracy": (labeled_logits.argmax(dim=1) == labels).float().mean()}

    def student_view(self, weak: Tensor, batch: Batch) -> Tensor:
        """The view of this process's unlabeled images the student learns from, (b, C, S, S) in [0, 1]."""
        return weak

    def unlabeled_loss(self, logits: Tensor, weak: Tensor) -> dict[str, Tensor]:
        """{"unlabeled_loss": scalar, ...} from the student's (b, K) logits of its view and the weak view."""
        raise NotImplementedError


class FixMatchTrainer(SemiTrainer):
    """FixMatch: the student learns on strong views; its own weak-view predictions (no gradient) are the targets."""

    def student_view(self, weak: Tensor, batch: Batch) -> Tensor:
        draws = self.strong.sample(batch.global_size, batch.generator, torch.device("cpu"))
        return self.strong.apply(batch.inputs, {k: v[batch.rows].to(self.device) for k, v in draws.items()})

    def unlabeled_loss(self, logits: Tensor, weak: Tensor) -> dict[str, Tensor]:
        with torch.no_grad():
            weak_logits = self.forward_model(self.normalize(weak))
        loss, mask_rate = fixmatch_loss(weak_logits, logits, threshold=self.cfg.threshold)
        return {"unlabeled_loss": loss, "mask_rate": mask_rate}


class DistillTrainer(SemiTrainer):
    """SimCLRv2's self-distillation: the frozen teacher's soft targets for the weak view the student sees.

    Args (beyond `SemiTrainer`'s): teacher, the finetuned classifier; kept in eval mode, never updated.
    """

    def __init__(self, *args: Any, teacher: nn.Module, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.teacher = teacher.to(self.device).eval().requires_grad_(False)

    def unlabeled_loss(self, logits: Tensor, weak: Tensor) -> dict[str, Tensor]:
        with torch.no_grad():
            targets = self.teacher(self.normalize(weak))
        loss = distillation_loss(logits, targets, temperature=self.cfg.temperature)
        return {"unlabeled_loss": loss, "teacher_confidence": torch.softmax(targets.float(), 1).amax(1).mean()}


SEMI_METHODS: dict[str, type[SemiTrainer]] = {"fixmatch": FixMatchTrainer, "distill": DistillTrainer}


@dataclass
class SemiPaths:
    """Where the semi stage reads and writes (all from dvc.yaml)."""

    data: Path
    encoder: Path
    finetuned: Path
    out: Path
    metrics: Path
    plots: Path
    checkpoints: Path

    def start(self, cfg: SemiParams) -> Path:
        """The folder the student starts from: the finetuned classifier or the pretrained encoder."""
        return self.finetuned if cfg.init == "finetuned" else self.encoder


def logged_params(params: VisionParams) -> dict[str, Any]:
    """The flat params the semi stage declares in dvc.yaml, as MLflow logs them (the architecture is the saved one)."""
    return {"seed": params.seed, "device": params.device, **flatten(params.semi, prefix="semi.")}


def fingerprint(params: VisionParams, paths: SemiPaths) -> str:
    """Identifies a semi run for resuming: params, data, the classifier and encoder it reads, library code."""
    return params_hash({**logged_params(params), "data": prepared_digest(paths.data),
                        "finetuned": encoder_digest(paths.finetuned), "encoder": encoder_digest(paths.encoder),
                        "code": code_digest()})


def check_inputs(params: VisionParams, paths: SemiPaths) -> None:
    """What the data and the upstream models decide, before the MLflow run: the finetuned classifier and the
    encoder against the `model` section, the threshold against the label smoothing over the data's classes, and
    both batch sizes against the splits.

    Raises:
        ConfigError: naming the key; DataError, FileNotFoundError, ValueError: missing or wrong inputs.
    """
    cfg = params.semi
    finetuned = read_network_config(paths.finetuned)
    if not finetuned.get("num_classes") or finetuned.get("abstain"):
        raise ValueError(f"{paths.finetuned} is not a finetuned classifier (config.json num_classes, no abstain)")
    if cfg.method == "none":
        return
    labeled, unlabeled = read_meta(paths.data, "labeled"), read_meta(paths.data, "unlabeled")
    cfg.check_threshold(len(labeled["class_names"]))
    if cfg.init == "encoder" and read_network_config(paths.encoder).get("num_classes", 0):
        raise ValueError(f"{paths.encoder} holds a classifier, not a pretrained encoder")
    check_batch_size(cfg, unlabeled["shape"][0], "unlabeled images")
    micro = cfg.labeled_batch_size // cfg.accumulation_steps
    if micro % dist.world_size() or cfg.labeled_batch_size > labeled["shape"][0]:
        raise ConfigError(f"{cfg.dotted('labeled_batch_size')}={cfg.labeled_batch_size}: must be at most the "
                          f"{labeled['shape'][0]} labeled images, and {micro} a micro-step must divide evenly over "
                          f"{dist.world_size()} processes")


def build_student(params: VisionParams, paths: SemiPaths, num_classes: int) -> tuple[nn.Module, Preprocess]:
    """The student: the finetuned classifier, or the pretrained encoder with a fresh head (seeded)."""
    cfg = params.semi
    torch.manual_seed(params.seed)
    network, preprocess, _ = load_network(paths.start(cfg), drop_path_rate=cfg.drop_path_rate)
    if cfg.init == "encoder":
        network = attach_head(network, num_classes)
    return network, preprocess.train()


def semi_trainer(cfg: SemiParams, student: nn.Module, preprocess: Preprocess, finetuned: nn.Module,
                 labeled: tuple[np.ndarray, np.ndarray], unlabeled: np.ndarray, **kwargs: Any) -> SemiTrainer:
    """The trainer of `cfg.method` for `student` over the labeled (images, labels) and the unlabeled images;
    `finetuned` is the teacher where the method has one. `kwargs` are the base trainer's."""
    extra = {"teacher": finetuned} if cfg.method == "distill" else {}
    return SEMI_METHODS[cfg.method](student, cfg, unlabeled, preprocess, labeled=labeled, **extra, **kwargs)


def run_semi(params: VisionParams, paths: SemiPaths, tracker: Tracker, device: torch.device) -> dict[str, Any]:
    """Train the semi-supervised classifier (resuming a matching checkpoint), or copy the finetuned one
    (`method: none`); rank 0 writes every out."""
    cfg = params.semi
    if cfg.method == "none":
        return copy_finetuned(paths, tracker) if dist.is_main() else {}
    labeled, unlabeled = read_split(paths.data, "labeled"), read_split(paths.data, "unlabeled")
    if labeled.labels is None:
        raise DataError(f"{paths.data}/labeled has no labels.npy: the semi stage needs labels")
    class_names = list(labeled.meta["class_names"])
    student, preprocess = build_student(params, paths, len(class_names))
    trainer = semi_trainer(cfg, student, preprocess, load_network(paths.finetuned)[0], (labeled.images,
                           np.asarray(labeled.labels)), unlabeled.images, device=device, seed=params.seed,
                           checkpoint_dir=paths.checkpoints, tracker=tracker, fingerprint=fingerprint(params, paths))
    if dist.is_main():
        print(f"semi: {cfg.method} from the {cfg.init} model on {len(unlabeled)} unlabeled and {len(labeled)} labeled "
              f"images, {trainer.total_steps} steps of {cfg.batch_size} + {cfg.labeled_batch_size}, head lr "
              f"{trainer.lr:.2e}, {dist.world_size()} process(es) on {device}")
    started = time.perf_counter()
    result = trainer.fit()
    if not dist.is_main():
        return {}
    last = result.history[-1] if result.history else {}
    summary = {
        "method": cfg.method,
        **{key: value for key, value in last.items() if key != "step"},
        "images_per_second": result.samples_per_second,
        "steps": result.steps,
        "resumed_from_step": result.resumed_from,
        "train_seconds": round(time.perf_counter() - started, 2),
    }
    write_outputs(params, paths, trainer, summary, tracker, class_names=class_names)
    return summary


def write_outputs(params: VisionParams, paths: SemiPaths, trainer: SemiTrainer, summary: dict[str, Any],
                  tracker: Tracker, *, class_names: list[str]) -> None:
    """Classifier + config, loss curve, metrics; the classifier is registered with the finetuned version it
    started from (or was taught by), and `run.json` points at the run and the version."""
    from pipeline_lib.core.outputs import write_csv
    from pipeline_lib.core.registry import model_uri, register_model
    from pipeline_lib.vision.serving import CLASSIFIER, ClassifierModel, classifier_description

    cfg = params.semi
    finetuned = upstream_model(paths.finetuned, encoder_digest(paths.finetuned))
    source = read_network_config(paths.finetuned)
    columns = ["step", "loss", "labeled_loss", "unlabeled_loss", "mask_rate", "teacher_confidence", "train_accuracy",
               "lr"]
    with staged_dir(paths.plots) as plots:
        write_csv(plots / "loss.csv", trainer.history, [c for c in columns if c in trainer.history[-1]])
    with staged_dir(paths.out) as out:  # the finetuned classifier's own (resolved) architecture
        save_network(trainer.model, trainer.preprocess, saved_model_params(source), out,
                     in_chans=source["model"]["in_chans"], weights=CLASSIFIER_FILE, class_names=class_names,
                     mode="finetune", init=source.get("init"), encoder=source.get("encoder"),
                     data_digest=prepared_digest(paths.data), semi=cfg.method, finetuned=finetuned)
    per_step = set(trainer.history[-1]) if trainer.history else set()
    tracker.log_metrics({k: float(v) for k, v in summary.items() if k not in per_step and k != "method"},
                        step=trainer.total_steps)
    tracker.log_artifact(paths.plots / "loss.csv")
    tracker.flush()
    version = None
    if tracker.run_id is not None:
        name = params.tracking.classifier_model
        version = register_model(
            ClassifierModel(), paths.out, name=name, kind=CLASSIFIER, artifact_name="classifier",
            input_example=np.asarray(trainer.inputs[:2]), tags=tracker.lineage,
            description=classifier_description(name),
            headline=f"{cfg.method} after {summary['steps']} steps (semi stage); the evaluate stage replaces this "
                     "line with the test figures",
            started_from=model_uri(finetuned["model_name"], finetuned["model_version"]),
        )
    write_run_record(paths.out / "run.json", tracker, model_name=params.tracking.classifier_model,
                     model_version=version)
    write_json_atomic(paths.metrics, summary)


def copy_finetuned(paths: SemiPaths, tracker: Tracker) -> dict[str, Any]:
    """`method: none`: models/semi holds the finetuned classifier's files, its run record (the run and version
    that made the weights) and `semi: none` in its config; empty loss curve and metrics say nothing trained."""
    from pipeline_lib.core.outputs import write_csv

    with staged_dir(paths.plots) as plots:
        write_csv(plots / "loss.csv", [], ["step", "loss"])
    with staged_dir(paths.out) as out:
        for item in paths.finetuned.iterdir():
            if item.is_file() and item.name != CONFIG_FILE:
                shutil.copy2(item, out / item.name)
        config = {**read_network_config(paths.finetuned), "semi": "none"}
        (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    summary = {"method": "none", "steps": 0}
    tracker.log_metrics({"steps": 0.0})
    tracker.flush()
    write_json_atomic(paths.metrics, summary)
    return summary
