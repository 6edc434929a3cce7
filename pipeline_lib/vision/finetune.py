"""Supervised finetuning of a (pretrained or freshly initialised) encoder with a classification head.

The recipe follows MAE's finetuning (He et al. 2021, appendix A.1), scaled down: AdamW with layer-wise lr
decay (timm's `param_groups_layer_decay`: the head at the full lr, each block below at `layer_decay` times
the one above), warmup then cosine, label smoothing, stochastic depth, and optionally timm's mixup/cutmix.
`linear_probe` freezes the encoder and trains the head alone. Everything else (device, bf16, DDP,
accumulation, clipping, checkpoint/resume) is the base trainer's.

Randomness follows the base trainer's rule: crops and flips are drawn for the step's global batch from the
step's generator, so one process and N processes see the same images. timm's `Mixup` draws from numpy's global
generator and pairs images within a process's micro-batch; it is seeded per step and micro-batch, so a run
and its resume agree, but with mixup on, N processes pair images differently from one.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.optim import param_groups_layer_decay
from torch import Tensor, nn

from pipeline_lib.core import dist
from pipeline_lib.core.checkpoints import code_digest
from pipeline_lib.core.config import flatten, params_hash
from pipeline_lib.core.errors import ConfigError, DataError
from pipeline_lib.core.outputs import staged_dir
from pipeline_lib.core.tracking import Tracker, upstream_model, write_json_atomic, write_run_record
from pipeline_lib.core.trainer import Batch, Trainer, check_batch_size, step_seed
from pipeline_lib.vision.config import FinetuneParams, ModelParams, VisionParams
from pipeline_lib.vision.data.augment import AugmentConfig
from pipeline_lib.vision.data.store import image_origin, prepared_digest, read_meta, read_split
from pipeline_lib.vision.models.classifier import attach_head, head_only_train
from pipeline_lib.vision.models.compound import log_model_size
from pipeline_lib.vision.models.factory import (
    CLASSIFIER_FILE,
    build_encoder,
    check_encoder_input,
    encoder_digest,
    load_network,
    read_network_config,
    resolve_params,
    save_network,
    saved_model_params,
)
from pipeline_lib.vision.models.preprocess import Preprocess
from pipeline_lib.vision.trainer import ImageTrainer


class FinetuneTrainer(ImageTrainer[FinetuneParams]):
    """Cross-entropy on the labeled split, with the finetuning recipe's regularisers."""

    stage = "finetune"

    def __init__(self, *args: Any, num_classes: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.labels is None:
            raise ValueError("finetuning needs labels: pass the labeled split's labels")
        cfg = self.cfg
        self.num_classes = num_classes
        self.mixup = None
        if cfg.mixes:
            self.mixup = Mixup(mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha, prob=cfg.mixup_prob,
                               label_smoothing=cfg.label_smoothing, num_classes=num_classes)

    def augment_config(self) -> AugmentConfig | None:
        """Crops and flips only: colour changes need not preserve the label."""
        cfg = self.cfg
        if cfg.crop_scale_min == 1.0 and cfg.flip_p == 0:
            return None
        return AugmentConfig(crop_scale=(cfg.crop_scale_min, 1.0), flip_p=cfg.flip_p, jitter_p=0.0,
                             grayscale_p=0.0, blur_p=0.0)

    def param_groups(self) -> list[dict[str, Any]]:
        """Layer-wise lr decay groups over the parameters that train (all, or the head in a linear probe)."""
        return layer_decay_groups(self.model, self.cfg.weight_decay, self.cfg.layer_decay)

    def train_mode(self) -> None:
        if self.cfg.mode == "linear_probe":
            head_only_train(self.model)
        else:
            self.model.train()

    def compute_loss(self, batch: Batch) -> dict[str, Tensor]:
        images, labels = self.augmented(batch), batch.labels
        if self.mixup is not None:
            np.random.seed((step_seed(self.seed, batch.step) + batch.rows.start) % 2**32)
            images, targets = self.mixup(images, labels)  # soft targets (b, classes), smoothing included
            logits = self.forward_model(self.normalize(images))
            loss = F.cross_entropy(logits.float(), targets)
            hits = logits.argmax(dim=1) == targets.argmax(dim=1)
        else:
            logits = self.forward_model(self.normalize(images))
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.cfg.label_smoothing)
            hits = logits.argmax(dim=1) == labels
        return {"loss": loss, "train_accuracy": hits.float().mean()}


def layer_decay_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
    """AdamW groups with layer-wise lr decay (timm's `param_groups_layer_decay`): the head at the full lr, each block
    below at `layer_decay` times the one above; no weight decay on biases, norms and the model's `no_weight_decay`."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    return param_groups_layer_decay(model, weight_decay, no_weight_decay_list=skip, layer_decay=layer_decay)


@dataclass
class FinetunePaths:
    """Where a finetune stage reads and writes (all from dvc.yaml). `encoder` None: train from scratch."""

    data: Path
    encoder: Path | None
    out: Path
    metrics: Path
    plots: Path
    checkpoints: Path


def recipe(params: VisionParams, encoder: Path | None) -> VisionParams:
    """The params a finetune run trains with. From a pretrained `encoder`: as they are. From random weights (None):
    the baseline's own recipe, `finetune_scratch`, put in the `finetune` section, so that the trainer, the logged
    params (`finetune.*` in both runs, which the MLflow UI compares key by key) and the fingerprint read one place."""
    return params if encoder is not None else dataclasses.replace(params, finetune=params.finetune_scratch)


def logged_params(params: VisionParams) -> dict[str, Any]:
    """The flat params a finetune stage declares in dvc.yaml, as MLflow logs them."""
    return {
        "seed": params.seed,
        "device": params.device,
        **flatten(params.model, prefix="model."),
        **flatten(params.finetune, prefix="finetune."),
    }




def fingerprint(params: VisionParams, paths: FinetunePaths) -> str:
    """Identifies a finetuning run for resuming: params, data, the encoder it starts from, library code."""
    return params_hash({**logged_params(params), "data": prepared_digest(paths.data),
                        "encoder": encoder_digest(paths.encoder), "code": code_digest()})


def check_encoder(config: dict[str, Any], model: ModelParams, encoder_dir: Path) -> None:
    """The pretrained encoder (its `config.json`) must be an encoder with the architecture `params.yaml`
    declares, else finetuning is not the experiment the params describe. `model` is the resolved spec
    (compound scaling applied), as the encoder saved it.

    Raises:
        ValueError: the folder holds a classifier; ConfigError: a `model.*` key differs from the encoder's.
    """
    if config.get("num_classes", 0):
        raise ValueError(f"{encoder_dir} holds a classifier, not a pretrained encoder")
    built = dataclasses.asdict(saved_model_params(config))
    for key, value in dataclasses.asdict(model).items():
        if key == "img_size" and value is None:  # null: the data's size, which the encoder recorded
            continue
        if built[key] != value:
            raise ConfigError(
                f"model.{key}={value!r}: must match the encoder in {encoder_dir}, pretrained with {key}={built[key]!r} "
                f"(both after compound scaling); rerun pretraining (dvc repro) or set the model section back"
            )


def check_inputs(params: VisionParams, paths: FinetunePaths) -> None:
    """The params that only the prepared data and the pretrained encoder decide, checked by the stage before
    its MLflow run from meta.json and config.json: the encoder for the images' side
    (`factory.check_encoder_input`), the `model` section against the pretrained encoder (`check_encoder`), and
    `finetune.batch_size` against the labeled split (and the processes).

    Raises:
        ConfigError: naming the key; DataError, FileNotFoundError, ValueError: missing or wrong inputs.
    """
    meta = read_meta(paths.data, "labeled")
    count, height = meta["shape"][:2]
    resolved, _ = check_encoder_input(params, data_img_size=height, origin=image_origin(meta, paths.data))
    if paths.encoder is not None:
        check_encoder(read_network_config(paths.encoder), resolved.model, paths.encoder)
    check_batch_size(params.finetune, count, "labeled images")


def build_classifier(params: VisionParams, paths: FinetunePaths, *, in_chans: int, img_size: int, num_classes: int,
                     pixel_stats: tuple[list[float], list[float]]) -> tuple[nn.Module, Preprocess]:
    """The pretrained encoder (or a fresh one, same architecture) with a new head, and its preprocessing.

    `params.model` is the resolved spec (`resolve_params`) and `img_size` its input side.
    """
    cfg = params.finetune
    torch.manual_seed(params.seed)  # identical head (and scratch encoder) on every process
    if paths.encoder is not None:
        encoder, preprocess, config = load_network(paths.encoder, drop_path_rate=cfg.drop_path_rate)
        check_encoder(config, params.model, paths.encoder)
    else:
        encoder = build_encoder(params.model, in_chans=in_chans, img_size=img_size,
                                drop_path_rate=cfg.drop_path_rate)
        preprocess = Preprocess(*pixel_stats, img_size)
    model = attach_head(encoder, num_classes, freeze_encoder=cfg.mode == "linear_probe")
    return model, preprocess.train()


def run_finetune(params: VisionParams, paths: FinetunePaths, tracker: Tracker, device: torch.device, *,
                 register: bool) -> dict[str, Any]:
    """Train the classifier on the labeled split (resuming a matching checkpoint); rank 0 writes every out.

    Args:
        register: log the classifier as a model version of `tracking.classifier_model` with alias challenger
            (the SSL-finetuned model; the from-scratch baseline is only measured).
    """
    cfg = params.finetune
    labeled = read_split(paths.data, "labeled")
    if labeled.labels is None:
        raise DataError(f"{paths.data}/labeled has no labels.npy: finetuning needs labels")
    class_names = list(labeled.meta["class_names"])
    _, height, _, in_chans = labeled.images.shape
    run_fingerprint = fingerprint(params, paths)  # of the params as configured
    params, scaling = resolve_params(params, data_img_size=height)  # from here on: the encoder actually built
    model, preprocess = build_classifier(
        params, paths, in_chans=in_chans, img_size=scaling.img_size, num_classes=len(class_names),
        pixel_stats=(labeled.meta["pixel_mean"], labeled.meta["pixel_std"]),
    )
    if dist.is_main():  # before the trainer moves the model: counted on the CPU, in eval mode, weights untouched
        log_model_size("finetune", scaling, model, in_chans=in_chans, tracker=tracker)
    trainer = FinetuneTrainer(
        model, cfg, labeled.images, preprocess, labels=np.asarray(labeled.labels), num_classes=len(class_names),
        device=device, seed=params.seed, checkpoint_dir=paths.checkpoints, tracker=tracker,
        fingerprint=run_fingerprint,
    )
    if dist.is_main():
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        start = "pretrained encoder " + str(paths.encoder) if paths.encoder else "scratch"
        print(f"finetune: {cfg.mode} from {start} on {len(labeled)} labeled images, {len(class_names)} classes, "
              f"{trainable / 1e6:.3f}M trainable params, {trainer.total_steps} steps of {cfg.batch_size}, "
              f"head lr {trainer.lr:.2e}, layer decay {cfg.layer_decay}, {dist.world_size()} process(es) on {device}")
    started = time.perf_counter()
    result = trainer.fit()
    if not dist.is_main():
        return {}
    history = result.history[-1] if result.history else {}
    summary = {
        "loss": history.get("loss", float("nan")),
        "train_accuracy": history.get("train_accuracy", float("nan")),
        "images_per_second": result.samples_per_second,
        "steps": result.steps,
        "resumed_from_step": result.resumed_from,
        "train_seconds": round(time.perf_counter() - started, 2),
    }
    write_outputs(params, paths, trainer, summary, tracker, class_names=class_names, register=register)
    return summary


def write_outputs(params: VisionParams, paths: FinetunePaths, trainer: Trainer, summary: dict[str, Any],
                  tracker: Tracker, *, class_names: list[str], register: bool) -> None:
    """Classifier + config, loss curve and metrics, each written aside and moved in; the classifier is
    registered (when asked) and `run.json` points at the run and the model version."""
    from pipeline_lib.core.outputs import write_csv
    from pipeline_lib.core.registry import model_uri, register_model
    from pipeline_lib.vision.serving import CLASSIFIER, ClassifierModel, classifier_description

    encoder = upstream_model(paths.encoder, encoder_digest(paths.encoder))
    with staged_dir(paths.plots) as plots:
        write_csv(plots / "loss.csv", trainer.history, ["step", "loss", "train_accuracy", "lr"])
    with staged_dir(paths.out) as out:
        save_network(trainer.model, trainer.preprocess, params.model, out, in_chans=trainer.inputs.shape[-1],
                     weights=CLASSIFIER_FILE, class_names=class_names, mode=params.finetune.mode,
                     init="pretrained" if paths.encoder is not None else "scratch",
                     encoder=encoder,
                     data_digest=prepared_digest(paths.data))
    per_step = set(trainer.history[-1]) if trainer.history else set()
    tracker.log_metrics({k: float(v) for k, v in summary.items() if k not in per_step}, step=trainer.total_steps)
    tracker.log_artifact(paths.plots / "loss.csv")
    tracker.flush()
    version = None
    if register and tracker.run_id is not None:
        name = params.tracking.classifier_model
        version = register_model(
            ClassifierModel(), paths.out, name=name, kind=CLASSIFIER, artifact_name="classifier",
            input_example=np.asarray(trainer.inputs[:2]), tags=tracker.lineage,
            description=classifier_description(name),
            headline=f"train accuracy {summary['train_accuracy']:.4f} after {summary['steps']} steps (finetune "
                     "stage); the evaluate stage replaces this line with the test figures",
            started_from=model_uri(encoder["model_name"], encoder["model_version"]),
        )
    record = {"model_name": params.tracking.classifier_model, "model_version": version} if register else {}
    write_run_record(paths.out / "run.json", tracker, **record)
    write_json_atomic(paths.metrics, summary)
