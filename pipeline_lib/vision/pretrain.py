"""Self-supervised pretraining: MAE, SimCLR and MoCo v3 on the base trainer, and the pretrain stage's entry.

Each method's trainer only says how a batch becomes a loss. Randomness (mask noise, augmentations) is drawn
for the global micro-batch from the step's generator and each process keeps its rows, so one process and N
processes train on identical inputs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pipeline_lib.core import dist
from pipeline_lib.core.checkpoints import code_digest
from pipeline_lib.core.config import flatten, params_hash
from pipeline_lib.core.errors import ConfigError
from pipeline_lib.core.outputs import staged_dir
from pipeline_lib.core.tracking import Tracker
from pipeline_lib.core.trainer import Batch, FitResult, Trainer, check_batch_size
from pipeline_lib.vision.config import ModelParams, PretrainParams, VisionParams
from pipeline_lib.vision.data.augment import AugmentConfig
from pipeline_lib.vision.data.store import image_origin, prepared_digest, read_meta, read_split
from pipeline_lib.vision.losses import CONTRASTIVE_LOSSES, mocov3_loss
from pipeline_lib.vision.models.compound import log_model_size
from pipeline_lib.vision.models.contrastive import MoCoV3, SimCLR
from pipeline_lib.vision.models.factory import build_encoder, check_encoder_input, is_vit, resolve_params, save_network
from pipeline_lib.vision.models.mae import MaskedAutoencoder
from pipeline_lib.vision.models.preprocess import Preprocess
from pipeline_lib.vision.trainer import ImageTrainer


class MAETrainer(ImageTrainer[PretrainParams]):
    """Masked autoencoding of random resized crops (and flips): reconstruct the masked patches from the rest.

    As in the MAE recipe, the only augmentation is geometric: crops and flips; masking is the regulariser.
    """

    stage = "pretrain"

    def augment_config(self) -> AugmentConfig:
        return augmentations(self.cfg)

    def compute_loss(self, batch: Batch) -> dict[str, Tensor]:
        images = self.augmented(batch)
        noise = torch.rand(batch.global_size, self.model.num_patches, generator=batch.generator)  # (B_global, L)
        loss, _, _ = self.forward_model(self.normalize(images), noise=noise[batch.rows].to(self.device))
        return {"loss": loss}


class TwoViewTrainer(ImageTrainer[PretrainParams]):
    """Shared by the contrastive methods: two views of each image under SimCLR's augmentations."""

    stage = "pretrain"

    def augment_config(self) -> AugmentConfig:
        return augmentations(self.cfg)

    def views(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """Two normalised views of this process's images, (b, C, S, S) each."""
        return self.normalize(self.augmented(batch)), self.normalize(self.augmented(batch))


class SimCLRTrainer(TwoViewTrainer):
    """SimCLR: a projection head and a two-view loss (NT-Xent with negatives from every process, or margin)."""

    def compute_loss(self, batch: Batch) -> dict[str, Tensor]:
        z1, z2 = self.forward_model(*self.views(batch))
        options = {"temperature": self.cfg.temperature} if self.cfg.loss == "nt_xent" else {"margin": self.cfg.margin}
        return {"loss": CONTRASTIVE_LOSSES[self.cfg.loss](z1, z2, **options)}


class MoCoV3Trainer(TwoViewTrainer):
    """MoCo v3: predictor on the online branch, momentum encoder for keys, symmetric InfoNCE."""

    def compute_loss(self, batch: Batch) -> dict[str, Tensor]:
        q1, q2, k1, k2 = self.forward_model(*self.views(batch))
        return {"loss": mocov3_loss(q1, q2, k1, k2, temperature=self.cfg.temperature)}

    def after_step(self, step: int) -> None:
        """Momentum rises from `momentum` to 1 on a half-cosine over training, as in MoCo v3."""
        base = self.cfg.momentum
        momentum = 1.0 - (1.0 - base) * 0.5 * (1.0 + math.cos(math.pi * (step + 1) / self.total_steps))
        self.model.update_momentum(momentum)


TRAINERS: dict[str, type[Trainer]] = {"mae": MAETrainer, "simclr": SimCLRTrainer, "mocov3": MoCoV3Trainer}


def check_method(cfg: PretrainParams, model: ModelParams) -> None:
    """MAE removes patches: it needs a ViT encoder (`model` is the resolved spec)."""
    if cfg.method == "mae" and not is_vit(model.name):
        raise ConfigError(
            f"pretrain.method='mae': needs a ViT encoder; model.name={model.name!r} is not a timm "
            "VisionTransformer (accepted: 'vit', a timm ViT name, or pretrain.method simclr/mocov3)"
        )


def build_pretrain_model(cfg: PretrainParams, model: ModelParams, *, in_chans: int, img_size: int) -> nn.Module:
    """The method's model around a fresh encoder; its `.encoder` or `.backbone` is what gets exported."""
    check_method(cfg, model)
    encoder = build_encoder(model, in_chans=in_chans, img_size=img_size, drop_path_rate=cfg.drop_path_rate)
    if cfg.method == "mae":
        return MaskedAutoencoder(
            encoder, decoder_embed_dim=cfg.decoder_embed_dim, decoder_depth=cfg.decoder_depth,
            decoder_num_heads=cfg.decoder_num_heads, mask_ratio=cfg.mask_ratio, norm_pix_loss=cfg.norm_pix_loss,
        )
    heads = {"projection_dim": cfg.projection_dim, "hidden_dim": cfg.hidden_dim}
    return SimCLR(encoder, **heads) if cfg.method == "simclr" else MoCoV3(encoder, **heads)


def augmentations(cfg: PretrainParams) -> AugmentConfig:
    """MAE: crops and flips only. Contrastive methods: SimCLR's full set (crop, flip, colour, blur)."""
    geometric = {"crop_scale": (cfg.crop_scale_min, 1.0), "flip_p": cfg.flip_p}
    if cfg.method == "mae":
        return AugmentConfig(**geometric, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    return AugmentConfig(**geometric)


def exported_encoder(model: nn.Module) -> nn.Module:
    return model.encoder if isinstance(model, MaskedAutoencoder) else model.backbone


def logged_params(params: VisionParams) -> dict[str, Any]:
    """The flat params the pretrain stage declares in dvc.yaml, as MLflow logs them."""
    return {
        "seed": params.seed,
        "device": params.device,
        **flatten(params.model, prefix="model."),
        **flatten(params.pretrain, prefix="pretrain."),
    }


# What pretraining reads of the prepared data. Nothing labeled: a change of labels alone (data.label_fraction)
# leaves this split byte-identical, so DVC does not retrain the encoder (dvc.yaml depends on this folder alone).
SPLIT = "unlabeled"


def data_digest(data_dir: Path) -> str:
    """The sha256 of the split pretraining reads."""
    return prepared_digest(data_dir, splits=(SPLIT,))


def fingerprint(params: VisionParams, data_dir: Path) -> str:
    """Identifies a training run for resuming: its params, the exact unlabeled split and the library code."""
    return params_hash({**logged_params(params), "data": data_digest(data_dir), "code": code_digest()})


@dataclass
class PretrainPaths:
    """Where the pretrain stage reads and writes (all from dvc.yaml)."""

    data: Path
    out: Path
    metrics: Path
    plots: Path
    checkpoints: Path


def check_inputs(params: VisionParams, paths: PretrainPaths) -> None:
    """The params that only the prepared data decides, checked by the stage before its MLflow run, from the
    unlabeled split's meta.json: the encoder for the images' side (`factory.check_encoder_input`), a ViT for
    MAE, and `pretrain.batch_size` against the split (and the processes).

    Raises:
        ConfigError: naming the key; DataError: no prepared unlabeled split.
    """
    meta = read_meta(paths.data, SPLIT)
    count, height = meta["shape"][:2]
    resolved, _ = check_encoder_input(params, data_img_size=height, origin=image_origin(meta, paths.data))
    check_method(params.pretrain, resolved.model)
    check_batch_size(params.pretrain, count, "unlabeled images")


def run_pretrain(params: VisionParams, paths: PretrainPaths, tracker: Tracker, device: torch.device) -> dict[str, Any]:
    """Train the encoder (resuming a matching checkpoint), then, on rank 0, evaluate and write every out.

    The `model` section is compound-scaled here, once (`resolve_params`): from here on `params.model` is the
    encoder actually built and saved; the checkpoint fingerprint is of the params as configured.
    """
    cfg = params.pretrain
    unlabeled = read_split(paths.data, SPLIT)
    _, height, width, in_chans = unlabeled.images.shape
    run_fingerprint = fingerprint(params, paths.data)
    params, scaling = resolve_params(params, data_img_size=height)
    img_size = scaling.img_size
    preprocess = Preprocess(unlabeled.meta["pixel_mean"], unlabeled.meta["pixel_std"], img_size)
    torch.manual_seed(params.seed)  # identical initial weights on every process (DDP also broadcasts rank 0's)
    model = build_pretrain_model(cfg, params.model, in_chans=in_chans, img_size=img_size)
    if dist.is_main():  # before the trainer moves the model: counted on the CPU, in eval mode, weights untouched
        log_model_size("pretrain", scaling, exported_encoder(model), in_chans=in_chans, tracker=tracker)
    trainer = TRAINERS[cfg.method](
        model, cfg, unlabeled.images, preprocess, device=device, seed=params.seed,
        checkpoint_dir=paths.checkpoints, tracker=tracker, fingerprint=run_fingerprint,
    )
    if dist.is_main():
        n_params = sum(p.numel() for p in exported_encoder(model).parameters())
        print(f"pretrain: {cfg.method} on {len(unlabeled)} images {height}x{width}x{in_chans} -> {img_size}, "
              f"encoder {params.model.name} ({n_params / 1e6:.2f}M params), {trainer.total_steps} steps of "
              f"{cfg.batch_size} images, lr {trainer.lr:.2e}, {dist.world_size()} process(es) on {device}")
    started = time.perf_counter()
    result = trainer.fit()
    if not dist.is_main():
        return {}
    summary = summarize(trainer, result, time.perf_counter() - started)
    write_outputs(params, paths, trainer, summary, tracker)
    return summary


def summarize(trainer: Trainer, result: FitResult, wall_time: float) -> dict[str, Any]:
    """Headline numbers of the run: final loss and throughput. The encoder's probes (kNN, linear) are the
    evaluate stage's: they need labels, which pretraining never reads."""
    return {
        "loss": result.history[-1]["loss"] if result.history else float("nan"),
        "images_per_second": result.samples_per_second,
        "steps": result.steps,
        "resumed_from_step": result.resumed_from,
        "train_seconds": round(wall_time, 2),
    }


def write_outputs(params: VisionParams, paths: PretrainPaths, trainer: Trainer, summary: dict[str, Any],
                  tracker: Tracker) -> None:
    """Encoder + config, metrics JSON, loss curve and example picture, each written aside and moved in; then
    the encoder is registered in MLflow and `run.json` points at the run and the model version."""
    import matplotlib.pyplot as plt

    from pipeline_lib.core.outputs import write_csv
    from pipeline_lib.core.registry import register_model
    from pipeline_lib.core.tracking import write_json_atomic, write_run_record
    from pipeline_lib.vision.plots import pretrain_examples
    from pipeline_lib.vision.serving import ENCODER, EncoderModel, encoder_description

    with staged_dir(paths.plots) as plots:
        write_csv(plots / "loss.csv", trainer.history, ["step", "loss", "lr", "images_per_second"])
        figure, title = pretrain_examples(trainer)
        figure.savefig(plots / "examples.png", dpi=100)
    with staged_dir(paths.out) as out:
        save_network(exported_encoder(trainer.model), trainer.preprocess, params.model, out,
                     in_chans=trainer.inputs.shape[-1], method=params.pretrain.method,
                     data_digest=data_digest(paths.data))
    per_step = set(trainer.history[-1]) if trainer.history else set()  # already curves in MLflow
    tracker.log_metrics({k: float(v) for k, v in summary.items() if k not in per_step}, step=trainer.total_steps)
    tracker.log_figure(figure, f"{title}.png")
    plt.close(figure)
    tracker.log_artifact(paths.plots / "loss.csv")
    tracker.flush()
    version = None
    if tracker.run_id is not None:
        name = params.tracking.encoder_model
        headline = f"final loss {summary['loss']:.4f}"
        version = register_model(
            EncoderModel(), paths.out, name=name, kind=ENCODER, artifact_name="encoder",
            input_example=np.asarray(trainer.inputs[:2]), tags=tracker.lineage, description=encoder_description(name),
            headline=f"{headline} after {summary['steps']} steps of {params.pretrain.method} (pretrain stage)",
        )
    write_run_record(paths.out / "run.json", tracker, model_name=params.tracking.encoder_model, model_version=version)
    write_json_atomic(paths.metrics, summary)
