"""Typed, validated params: one frozen dataclass per `params.yaml` section.

`load_params` reads the file, rejects unknown keys, converts each value to the type its field declares and
runs each section's `__post_init__` checks. Every error is a `ConfigError` whose message starts with the
dotted key and the offending value and says what is accepted, e.g.
`data.label_fraction=1.5: must be in (0, 1]`. Nothing else in the pipeline validates params again.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

import yaml

DataSource = Literal["digits", "cifar10", "stl10", "imagefolder"]
Device = Literal["auto", "cpu", "cuda", "mps"]
GlobalPool = Literal["token", "avg"]

# Official archives (URL, sha256). A user may point `data.url` at a mirror with its own sha256.
OFFICIAL_ARCHIVES: dict[str, tuple[str, str]] = {
    "cifar10": (
        "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
        "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
    ),
    "stl10": (
        "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz",
        "f31fd99273a1acb8609c8db427cebb1de3f71de77758cdc0e22956e1289b9866",
    ),
}

_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_METRIC = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./ -]*")


class ConfigError(ValueError):
    """A params value is missing, unknown, of the wrong type or out of range; the message names the key."""


def _fail(key: str, value: Any, rule: str) -> typing.NoReturn:
    raise ConfigError(f"{key}={value!r}: {rule}")


def _check(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        _fail(key, value, rule)


@dataclass(frozen=True)
class TrackingParams:
    """Where and under which names MLflow records runs and model versions.

    Every registered name holds one kind of model (track, role and, for language models, objective), so any
    version of a name can stand in for any other and `@challenger` / `@champion` compare like with like:
    `encoder_model` (the pretrain stage's encoder), `classifier_model` (the finetune stage's classifier and
    its GRPO successor from rl), and per objective `<lm_model>-ar` / `<lm_model>-mdm` (text_pretrain) and
    `<task_model>-ar` / `<task_model>-mdm` (text_sft and its GRPO successor from text_rl).
    """

    objectives: ClassVar[tuple[str, ...]] = ("ar", "mdm")

    experiment: str = "ssl-pipeline"
    encoder_model: str = "ssl-pipeline-encoder"
    classifier_model: str = "ssl-pipeline-classifier"
    lm_model: str = "ssl-pipeline-lm"  # prefix: the language models are <lm_model>-ar and <lm_model>-mdm
    task_model: str = "ssl-pipeline-task-lm"  # prefix: the task models are <task_model>-ar and <task_model>-mdm

    def __post_init__(self) -> None:
        for name in ("experiment", "encoder_model", "classifier_model", "lm_model", "task_model"):
            value = getattr(self, name)
            _check(
                bool(_NAME.fullmatch(value)),
                f"tracking.{name}",
                value,
                "must be a non-empty name of letters, digits, '.', '_' or '-'",
            )
        seen: dict[str, str] = {}
        for gate, name in self.registered_models().items():
            key = f"{gate.split('_')[0]}_model"  # lm_ar -> lm_model
            _check(name not in seen, f"tracking.{key}", getattr(self, key),
                   f"gives the registered name {name!r}, as tracking.{seen.get(name)} does; each kind of model "
                   "needs a name of its own")
            seen[name] = key

    def lm_name(self, objective: str) -> str:
        """The registered name of the pretrained language models of one objective."""
        return f"{self.lm_model}-{objective}"

    def task_name(self, objective: str) -> str:
        """The registered name of the task models (SFT, then GRPO) of one objective."""
        return f"{self.task_model}-{objective}"

    def registered_models(self) -> dict[str, str]:
        """Every registered name, keyed as the promotion gates are: encoder, classifier, lm_ar, ..., task_mdm."""
        return {"encoder": self.encoder_model, "classifier": self.classifier_model,
                **{f"lm_{objective}": self.lm_name(objective) for objective in self.objectives},
                **{f"task_{objective}": self.task_name(objective) for objective in self.objectives}}


@dataclass(frozen=True)
class DataParams:
    """What the fetch stage downloads or reads and how it splits it (see the data contract in the README)."""

    source: DataSource = "digits"
    url: str | None = None
    sha256: str | None = None
    path: str | None = None
    image_size: int | None = None
    label_fraction: float = 0.1
    rl_fraction: float = 0.1
    test_fraction: float = 0.2
    max_images: int | None = None

    def __post_init__(self) -> None:
        _check(0.0 < self.label_fraction <= 1.0, "data.label_fraction", self.label_fraction, "must be in (0, 1]")
        _check(0.0 <= self.rl_fraction < 1.0, "data.rl_fraction", self.rl_fraction, "must be in [0, 1)")
        _check(0.0 < self.test_fraction < 1.0, "data.test_fraction", self.test_fraction, "must be in (0, 1)")
        _check(
            self.label_fraction + self.rl_fraction <= 1.0,
            "data.rl_fraction",
            self.rl_fraction,
            f"data.label_fraction + data.rl_fraction = {self.label_fraction} + {self.rl_fraction} must be <= 1 "
            "(the labeled and rl splits are disjoint); lower one, e.g. rl_fraction 0 with label_fraction 1",
        )
        if self.max_images is not None:
            _check(self.max_images >= 1, "data.max_images", self.max_images, "must be a positive integer or null")
        if self.image_size is not None:
            _check(self.image_size >= 1, "data.image_size", self.image_size, "must be a positive integer or null")
            _check(
                self.source == "imagefolder",
                "data.image_size",
                self.image_size,
                f"only the imagefolder source resizes images; remove it for source {self.source!r}",
            )
        if self.sha256 is not None:
            hex_digest = bool(_SHA256.fullmatch(self.sha256))
            _check(hex_digest, "data.sha256", self.sha256, "must be 64 hexadecimal characters")
        self._check_location()

    def _check_location(self) -> None:
        """Each source takes its images from exactly one place: bundled, an official URL, a mirror, a folder."""
        if self.source == "digits":
            for name in ("url", "sha256", "path"):
                value = getattr(self, name)
                _check(value is None, f"data.{name}", value, "must be null for source 'digits' (bundled data)")
            return
        _check(
            self.url is not None or self.sha256 is None,
            "data.sha256",
            self.sha256,
            "is only set together with data.url (it is the digest of the archive to download)",
        )
        if self.url is not None:
            _check(
                self.sha256 is not None,
                "data.sha256",
                self.sha256,
                f"is required with data.url={self.url!r}: downloads are verified before use",
            )
        if self.source in OFFICIAL_ARCHIVES:
            _check(self.path is None, "data.path", self.path, f"must be null for source {self.source!r}")
            return
        _check(
            (self.url is None) != (self.path is None),
            "data.path",
            self.path,
            "source 'imagefolder' needs exactly one of data.path (a local folder) or data.url (an archive)",
        )

    @property
    def archive(self) -> tuple[str, str] | None:
        """(url, sha256) to download, or None for bundled data and local folders."""
        if self.url is not None:
            assert self.sha256 is not None
            return self.url, self.sha256.lower()
        return OFFICIAL_ARCHIVES.get(self.source)


@dataclass(frozen=True)
class ModelParams:
    """The encoder architecture, shared by pretraining and finetuning.

    `name: vit` builds a timm `VisionTransformer` from `patch_size`, `embed_dim`, `depth` and `num_heads`;
    any other name is a timm model (`resnet18`, `efficientnet_b0`, `vit_small_patch16_224`, ...) built without
    pretrained weights. `img_size` (null: the prepared images' size) is the input size; for timm ViTs
    `patch_size` overrides the model's own (null keeps it) and `global_pool` says which features the encoder
    gives (the class token, or the mean of the patch tokens as in MAE's finetuning); CNNs ignore both.
    Stochastic depth is a training choice, set per stage (`pretrain.drop_path_rate`, `finetune.drop_path_rate`).

    Compound scaling (EfficientNet, Tan & Le 2019) grows the encoder with one knob: `compound_phi` = φ
    multiplies depth by `compound_alpha`^φ, width by `compound_beta`^φ and the input resolution by
    `compound_gamma`^φ (defaults: the paper's α = 1.2, β = 1.1, γ = 1.15). φ = 0 (the default) changes
    nothing. `vit` scales `depth`, `embed_dim` and `img_size` itself; `efficientnet_b0`..`efficientnet_b7`
    moves to the timm variant nearest the scaled multipliers (`pipeline_lib.models.compound`). The stages
    resolve the scaled spec once and save that (with φ = 0), so a saved config rebuilds the same network.
    """

    compound_models: ClassVar[tuple[str, ...]] = ("vit", *(f"efficientnet_b{i}" for i in range(8)))

    name: str = "vit"
    img_size: int | None = None
    patch_size: int | None = 2
    embed_dim: int = 64
    depth: int = 4
    num_heads: int = 4
    global_pool: GlobalPool = "avg"
    compound_phi: float = 0.0
    compound_alpha: float = 1.2
    compound_beta: float = 1.1
    compound_gamma: float = 1.15

    def __post_init__(self) -> None:
        _check(bool(self.name.strip()), "model.name", self.name, "must be 'vit' or a timm model name")
        _check(self.compound_phi >= 0, "model.compound_phi", self.compound_phi, "must be >= 0 (0: no scaling)")
        for name in ("compound_alpha", "compound_beta", "compound_gamma"):
            value = getattr(self, name)
            _check(value >= 1, f"model.{name}", value, "must be >= 1 (a multiplier per unit of model.compound_phi)")
        _check(
            self.compound_phi == 0 or self.name in self.compound_models,
            "model.compound_phi",
            self.compound_phi,
            f"compound scaling supports model.name {', '.join(self.compound_models)}; model.name={self.name!r} "
            "is none of them (set model.compound_phi to 0)",
        )
        for name in ("embed_dim", "depth", "num_heads"):
            value = getattr(self, name)
            _check(value >= 1, f"model.{name}", value, "must be a positive integer")
        if self.patch_size is not None:
            _check(self.patch_size >= 1, "model.patch_size", self.patch_size, "must be a positive integer or null")
        _check(
            self.name != "vit" or self.patch_size is not None,
            "model.patch_size",
            self.patch_size,
            "is required for model.name='vit'",
        )
        if self.img_size is not None:
            _check(self.img_size >= 1, "model.img_size", self.img_size, "must be a positive integer or null")
            _check(
                self.patch_size is None or self.img_size % self.patch_size == 0,
                "model.img_size",
                self.img_size,
                f"must be a multiple of model.patch_size={self.patch_size}",
            )
        _check(
            self.embed_dim % self.num_heads == 0,
            "model.num_heads",
            self.num_heads,
            f"must divide model.embed_dim={self.embed_dim}",
        )


Precision = Literal["auto", "fp32", "bf16"]


@dataclass(frozen=True)
class TrainParams:
    """Optimisation and runtime keys every training stage shares; the base trainer reads only these.

    `batch_size` is the global batch per optimizer step (all processes, all accumulation micro-steps), so
    results do not depend on how many processes run; lr = base_lr x batch_size / 256.
    """

    section: ClassVar[str] = "train"

    epochs: int = 10
    batch_size: int = 128
    accumulation_steps: int = 1
    base_lr: float = 1.0e-3
    min_lr: float = 0.0
    weight_decay: float = 0.05
    adam_beta2: float = 0.95
    warmup_epochs: float = 1.0
    clip_grad: float | None = None
    drop_path_rate: float = 0.0
    precision: Precision = "auto"
    compile: bool = False
    checkpoint_every: int = 100
    log_every: int = 10

    def __post_init__(self) -> None:
        key = f"{self.section}."
        _check(0.0 <= self.drop_path_rate < 1.0, key + "drop_path_rate", self.drop_path_rate, "must be in [0, 1)")
        for name in ("epochs", "batch_size", "accumulation_steps", "checkpoint_every", "log_every"):
            _check(getattr(self, name) >= 1, key + name, getattr(self, name), "must be a positive integer")
        _check(
            self.batch_size % self.accumulation_steps == 0,
            key + "batch_size",
            self.batch_size,
            f"must be a multiple of {key}accumulation_steps={self.accumulation_steps}",
        )
        _check(self.base_lr > 0, key + "base_lr", self.base_lr, "must be > 0")
        _check(0 <= self.min_lr <= self.base_lr, key + "min_lr", self.min_lr, f"must be in [0, {key}base_lr]")
        _check(self.weight_decay >= 0, key + "weight_decay", self.weight_decay, "must be >= 0")
        _check(0 < self.adam_beta2 < 1, key + "adam_beta2", self.adam_beta2, "must be in (0, 1)")
        _check(
            0 <= self.warmup_epochs <= self.epochs,
            key + "warmup_epochs",
            self.warmup_epochs,
            f"must be in [0, {key}epochs={self.epochs}]",
        )
        if self.clip_grad is not None:
            _check(self.clip_grad > 0, key + "clip_grad", self.clip_grad, "must be > 0 or null (no clipping)")


PretrainMethod = Literal["mae", "simclr", "mocov3"]
ContrastiveLoss = Literal["nt_xent", "margin"]


@dataclass(frozen=True)
class PretrainParams(TrainParams):
    """Self-supervised pretraining: MAE on a ViT, or SimCLR / MoCo v3 on any timm backbone."""

    section: ClassVar[str] = "pretrain"

    method: PretrainMethod = "mae"
    epochs: int = 150
    base_lr: float = 1.5e-3
    warmup_epochs: float = 4.0
    # MAE
    mask_ratio: float = 0.5
    norm_pix_loss: bool = False
    decoder_embed_dim: int = 64
    decoder_depth: int = 2
    decoder_num_heads: int = 4
    # contrastive
    loss: ContrastiveLoss = "nt_xent"
    temperature: float = 0.2
    margin: float = 1.0
    projection_dim: int = 128
    hidden_dim: int = 512
    momentum: float = 0.99
    # augmentations (all methods)
    crop_scale_min: float = 0.5
    flip_p: float = 0.0
    # monitoring
    knn_k: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(0.0 < self.mask_ratio < 1.0, "pretrain.mask_ratio", self.mask_ratio, "must be in (0, 1)")
        sizes = ("decoder_embed_dim", "decoder_depth", "decoder_num_heads", "projection_dim", "hidden_dim", "knn_k")
        for name in sizes:
            _check(getattr(self, name) >= 1, f"pretrain.{name}", getattr(self, name), "must be a positive integer")
        _check(
            self.decoder_embed_dim % self.decoder_num_heads == 0,
            "pretrain.decoder_num_heads",
            self.decoder_num_heads,
            f"must divide pretrain.decoder_embed_dim={self.decoder_embed_dim}",
        )
        _check(self.temperature > 0, "pretrain.temperature", self.temperature, "must be > 0")
        _check(self.margin > 0, "pretrain.margin", self.margin, "must be > 0")
        _check(0.0 <= self.momentum < 1.0, "pretrain.momentum", self.momentum, "must be in [0, 1)")
        _check(0.0 < self.crop_scale_min <= 1.0, "pretrain.crop_scale_min", self.crop_scale_min, "must be in (0, 1]")
        _check(0.0 <= self.flip_p <= 1.0, "pretrain.flip_p", self.flip_p, "must be in [0, 1]")
        _check(
            self.method != "mocov3" or self.loss == "nt_xent",
            "pretrain.loss",
            self.loss,
            "mocov3 has its own symmetric InfoNCE loss; pretrain.loss applies to simclr only (leave it nt_xent)",
        )


FinetuneMode = Literal["finetune", "linear_probe"]


@dataclass(frozen=True)
class FinetuneParams(TrainParams):
    """Supervised training of encoder + classification head on the labeled split (MAE's finetuning recipe).

    `mode: finetune` trains everything with layer-wise lr decay (the head at lr, each block below it at
    `layer_decay` times the one above); `linear_probe` freezes the encoder (kept in eval mode) and trains the
    head only. Regularisers: label smoothing, stochastic depth, random resized crops and flips of the images,
    and timm's mixup/cutmix (off by default: on 8x8 digits they destroy the class evidence).
    """

    section: ClassVar[str] = "finetune"

    mode: FinetuneMode = "finetune"
    epochs: int = 100
    batch_size: int = 32
    base_lr: float = 3.0e-2
    adam_beta2: float = 0.999
    warmup_epochs: float = 5.0
    drop_path_rate: float = 0.1
    layer_decay: float = 0.75
    label_smoothing: float = 0.1
    crop_scale_min: float = 0.7
    flip_p: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mixup_prob: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(0.0 < self.layer_decay <= 1.0, "finetune.layer_decay", self.layer_decay, "must be in (0, 1] (1: off)")
        _check(0.0 <= self.label_smoothing < 1.0, "finetune.label_smoothing", self.label_smoothing, "must be in [0, 1)")
        _check(0.0 < self.crop_scale_min <= 1.0, "finetune.crop_scale_min", self.crop_scale_min,
               "must be in (0, 1] (1: no cropping)")
        for name in ("flip_p", "mixup_prob"):
            _check(0.0 <= getattr(self, name) <= 1.0, f"finetune.{name}", getattr(self, name), "must be in [0, 1]")
        for name in ("mixup_alpha", "cutmix_alpha"):
            _check(getattr(self, name) >= 0.0, f"finetune.{name}", getattr(self, name), "must be >= 0 (0: off)")
        micro = self.batch_size // self.accumulation_steps
        _check(
            not self.mixes or micro % 2 == 0,
            "finetune.batch_size",
            self.batch_size,
            f"mixup/cutmix pair each image with another in its micro-batch, so batch_size / accumulation_steps "
            f"= {micro} must be even",
        )

    @property
    def mixes(self) -> bool:
        """Whether mixup or cutmix is on."""
        return self.mixup_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)


@dataclass(frozen=True)
class EvaluateParams:
    """Test-split evaluation: calibration bins and the frozen-encoder probes (kNN, logistic regression)."""

    calibration_bins: int = 15
    knn_k: int = 20
    knn_temperature: float = 0.07
    probe_c: float = 1.0

    def __post_init__(self) -> None:
        for name in ("calibration_bins", "knn_k"):
            _check(getattr(self, name) >= 1, f"evaluate.{name}", getattr(self, name), "must be a positive integer")
        _check(self.knn_temperature > 0, "evaluate.knn_temperature", self.knn_temperature, "must be > 0")
        _check(self.probe_c > 0, "evaluate.probe_c", self.probe_c,
               "must be > 0 (inverse L2 strength of the logistic-regression probe)")


MetricMode = Literal["max", "min"]


@dataclass(frozen=True)
class GateParams:
    """One registered model's promotion gate: its challenger becomes its champion only if it beats the
    champion on `metric` (read from the MLflow run that registered each version) by more than `min_delta`
    in the direction `mode` (max: higher is better). Checked by `PromoteParams`, which knows the keys."""

    metric: str = ""
    mode: MetricMode = "max"
    min_delta: float = 0.0


@dataclass(frozen=True)
class PromoteParams:
    """The promotion gates (`python -m pipeline_lib.promote`): one optional gate per registered model, keyed
    as `TrackingParams.registered_models` keys them. A null gate is not applied.

    The vision gates read the metrics of the run that registered the version: `post_trained.*` (rl, on test)
    or `test.*` (added to the finetune runs by evaluate). The text task gates read `test.accuracy` (exact
    match), `test.format_rate`, `test.pass_at_<k>`, which text_task_evaluate adds to the text_sft and text_rl
    runs; the language-model gates `validation.bits_per_character`, added by text_evaluate.
    """

    encoder: GateParams | None = None
    classifier: GateParams | None = dataclasses.field(
        default_factory=lambda: GateParams("post_trained.reward_greedy", "max", 0.005))
    lm_ar: GateParams | None = None
    lm_mdm: GateParams | None = None
    task_ar: GateParams | None = dataclasses.field(default_factory=lambda: GateParams("test.accuracy", "max", 0.01))
    task_mdm: GateParams | None = dataclasses.field(default_factory=lambda: GateParams("test.accuracy", "max", 0.01))

    def __post_init__(self) -> None:
        for model, gate in self.gates().items():
            _check(bool(_METRIC.fullmatch(gate.metric)), f"promote.{model}.metric", gate.metric,
                   "must be the name of a metric logged by the run that registered the model, e.g. "
                   "post_trained.reward_greedy, test.top1 or test.accuracy")
            _check(math.isfinite(gate.min_delta) and gate.min_delta >= 0, f"promote.{model}.min_delta",
                   gate.min_delta, "must be a finite number >= 0 (how much better the challenger must be)")

    def gates(self) -> dict[str, GateParams]:
        """The declared gates, by model key (encoder, classifier, lm_ar, lm_mdm, task_ar, task_mdm)."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)
                if getattr(self, field.name) is not None}


RewardType = Literal["accuracy", "cost_matrix", "abstain"]
RewardScale = Literal["group", "none"]


@dataclass(frozen=True)
class RewardParams:
    """What a classifier's decision is worth, declared, never learned (see `pipeline_lib.rewards`).

    `accuracy`: 1 right, 0 wrong. `abstain`: `correct`, `wrong` and `abstain` for the extra action.
    `cost_matrix`: minus `cost_matrix[true][predicted]`, given inline as rows or as the path of a CSV file
    with one row per true class; its shape is checked against the classes when the RL stage starts.
    """

    type: RewardType = "abstain"
    correct: float = 1.0
    wrong: float = -1.0
    abstain: float = 0.0
    cost_matrix: list[list[float]] | str | None = None

    def __post_init__(self) -> None:
        if self.type == "abstain":
            _check(self.wrong < self.correct, "rl.reward.wrong", self.wrong,
                   f"must be below rl.reward.correct={self.correct}")
            _check(self.abstain <= self.correct, "rl.reward.abstain", self.abstain,
                   f"must not exceed rl.reward.correct={self.correct} (abstaining would pay more than a right answer)")
        if self.type == "cost_matrix":
            _check(self.cost_matrix is not None, "rl.reward.cost_matrix", self.cost_matrix,
                   "is required with rl.reward.type='cost_matrix': rows of costs (true class x predicted class) "
                   "or the path of a CSV file")
            if isinstance(self.cost_matrix, list):
                widths = {len(row) for row in self.cost_matrix}
                _check(len(self.cost_matrix) > 0 and widths == {len(self.cost_matrix)}, "rl.reward.cost_matrix",
                       self.cost_matrix, "must be a square matrix: one row per true class, one column per prediction")
        else:
            _check(self.cost_matrix is None, "rl.reward.cost_matrix", self.cost_matrix,
                   f"is only read with rl.reward.type='cost_matrix'; remove it for type {self.type!r}")


@dataclass(frozen=True)
class RLParams(TrainParams):
    """GRPO post-training of the finetuned classifier on the `rl` split (see `pipeline_lib.losses.grpo`).

    Per image, `group_size` actions are sampled from softmax(logits / temperature) (+ abstain); each sampled
    batch is used for `num_iterations` updates against the sampling policy, with the clip range `epsilon` /
    `epsilon_high` and a k3 KL penalty `beta` to the frozen finetuned reference. `scale_rewards: none`
    (Dr. GRPO) keeps the declared reward's trade-offs; `group` divides by each group's std.
    """

    section: ClassVar[str] = "rl"

    reward: RewardParams = dataclasses.field(default_factory=RewardParams)
    epochs: int = 50
    batch_size: int = 32
    base_lr: float = 1.0e-2
    adam_beta2: float = 0.999
    warmup_epochs: float = 0.0
    weight_decay: float = 0.0
    group_size: int = 8
    temperature: float = 1.0
    scale_rewards: RewardScale = "none"
    epsilon: float = 0.2
    epsilon_high: float = 0.28
    num_iterations: int = 1
    beta: float = 0.04
    head_only: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.group_size >= 2, "rl.group_size", self.group_size,
               "must be >= 2 (advantages are relative to the group)")
        _check(self.temperature > 0, "rl.temperature", self.temperature, "must be > 0")
        _check(0 < self.epsilon < 1, "rl.epsilon", self.epsilon, "must be in (0, 1)")
        _check(self.epsilon_high >= self.epsilon, "rl.epsilon_high", self.epsilon_high,
               f"must be >= rl.epsilon={self.epsilon} (clip-higher widens only the upper side)")
        _check(self.num_iterations >= 1, "rl.num_iterations", self.num_iterations, "must be a positive integer")
        _check(self.beta >= 0, "rl.beta", self.beta, "must be >= 0 (0: no KL penalty)")


TextSource = Literal["embedded", "url", "folder"]
TokenizerKind = Literal["char", "bpe"]
NGramMethod = Literal["kneser_ney", "add_k"]
LMObjective = Literal["ar", "mdm"]
HparamsMode = Literal["manual", "auto"]


@dataclass(frozen=True)
class TextDataParams:
    """The text track's corpus, split and tokenizer (see `pipeline_lib.text.corpus`).

    `embedded` is the English documentation CPython ships (`pydoc_data.topics`); `url` a plain-text file
    checked against `sha256`; `folder` every `*.txt` under `path`. The last `val_fraction` of the text
    (cut at a line break) is the validation split; the tokenizer is fitted on the training part only.
    """

    source: TextSource = "embedded"
    url: str | None = None
    sha256: str | None = None
    path: str | None = None
    val_fraction: float = 0.1
    tokenizer: TokenizerKind = "bpe"
    vocab_size: int = 1024

    def __post_init__(self) -> None:
        _check(0 < self.val_fraction <= 0.5, "text_data.val_fraction", self.val_fraction, "must be in (0, 0.5]")
        _check(self.vocab_size >= 257 or self.tokenizer == "char", "text_data.vocab_size", self.vocab_size,
               "must be >= 257 for a byte-level BPE (256 bytes and at least one merge)")
        if self.source == "url":
            _check(bool(self.url), "text_data.url", self.url, "is required with text_data.source='url'")
            _check(bool(self.sha256 and _SHA256.fullmatch(self.sha256)), "text_data.sha256", self.sha256,
                   "is required with text_data.source='url': the file's sha256 as 64 hex digits")
        if self.source == "folder":
            _check(bool(self.path), "text_data.path", self.path, "is required with text_data.source='folder'")
        used = {"url": ("url", "sha256"), "folder": ("path",), "embedded": ()}[self.source]
        for name in ("url", "sha256", "path"):
            _check(name in used or getattr(self, name) is None, f"text_data.{name}", getattr(self, name),
                   f"is not used with text_data.source={self.source!r}; set it to null")


@dataclass(frozen=True)
class TextMoEParams:
    """DeepSeek-V3's mixture-of-experts feed-forward for the text transformer (`pipeline_lib.models.moe`).

    Each token goes through `shared_experts` always and through `top_k` of `routed_experts` SwiGLU experts picked
    by sigmoid affinities plus a per-expert bias; the bias only picks, it never weights. After each optimizer step
    the bias moves by `bias_update_speed` (gamma) toward balance: up for an expert below the mean load, down for
    one above it (auxiliary-loss-free balancing). `groups` > 1 limits each token to the `topk_groups` best groups
    of experts (scored by their top-2 affinities). `balance_loss_alpha` > 0 adds the complementary sequence-wise
    balance loss. The first `dense_layers` blocks keep the dense feed-forward. `expert_hidden` null sizes an
    expert so that a token's activated experts hold about the dense feed-forward's parameters.
    """

    enabled: bool = False
    routed_experts: int = 8
    shared_experts: int = 1
    top_k: int = 2
    expert_hidden: int | None = None
    groups: int = 1
    topk_groups: int = 1
    route_scale: float = 1.0
    bias_update_speed: float = 1.0e-3
    balance_loss_alpha: float = 0.0
    dense_layers: int = 0

    def __post_init__(self) -> None:
        key = "text_model.moe."
        for name in ("routed_experts", "top_k", "groups", "topk_groups"):
            _check(getattr(self, name) >= 1, key + name, getattr(self, name), "must be a positive integer")
        for name in ("shared_experts", "dense_layers"):
            _check(getattr(self, name) >= 0, key + name, getattr(self, name), "must be an integer >= 0")
        if self.expert_hidden is not None:
            _check(self.expert_hidden >= 1, key + "expert_hidden", self.expert_hidden,
                   "must be a positive integer or null (sized from d_model)")
        _check(self.routed_experts % self.groups == 0, key + "groups", self.groups,
               f"must divide {key}routed_experts={self.routed_experts}")
        per_group = self.routed_experts // self.groups
        _check(self.groups == 1 or per_group >= 2, key + "groups", self.groups,
               "must leave at least 2 experts per group (a group is scored by its top-2 affinities)")
        _check(self.topk_groups <= self.groups, key + "topk_groups", self.topk_groups,
               f"must be <= {key}groups={self.groups}")
        _check(self.top_k <= self.topk_groups * per_group, key + "top_k", self.top_k,
               f"must be <= the {self.topk_groups * per_group} experts of the kept groups "
               f"({key}topk_groups x routed_experts / groups)")
        _check(self.route_scale > 0, key + "route_scale", self.route_scale, "must be > 0")
        _check(self.bias_update_speed >= 0, key + "bias_update_speed", self.bias_update_speed,
               "must be >= 0 (0: no bias update)")
        _check(self.balance_loss_alpha >= 0, key + "balance_loss_alpha", self.balance_loss_alpha,
               "must be >= 0 (0: no sequence-wise balance loss)")


@dataclass(frozen=True)
class TextModelParams:
    """The text track's transformer (pre-norm, RoPE, SwiGLU), shared by both objectives; `moe` turns its
    feed-forward layers into DeepSeek-V3 mixtures of experts."""

    d_model: int = 96
    n_layer: int = 2
    n_head: int = 3
    seq_len: int = 64
    dropout: float = 0.0  # on embeddings, attention weights and residual branches, while training only
    moe: TextMoEParams = dataclasses.field(default_factory=TextMoEParams)

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layer", "n_head", "seq_len"):
            _check(getattr(self, name) >= 1, f"text_model.{name}", getattr(self, name), "must be a positive integer")
        _check(0.0 <= self.dropout < 1.0, "text_model.dropout", self.dropout, "must be in [0, 1)")
        _check(self.d_model % self.n_head == 0 and (self.d_model // self.n_head) % 2 == 0, "text_model.n_head",
               self.n_head, f"must divide text_model.d_model={self.d_model} into heads of even size (RoPE)")
        _check(not self.moe.enabled or self.moe.dense_layers < self.n_layer, "text_model.moe.dense_layers",
               self.moe.dense_layers, f"must be below text_model.n_layer={self.n_layer} (no layer would be a "
               "mixture of experts)")


@dataclass(frozen=True)
class TextNGramParams:
    """The n-gram baseline: interpolated Kneser-Ney or add-k over token ids."""

    order: int = 5
    method: NGramMethod = "kneser_ney"
    discount: float = 0.75
    k: float = 0.01

    def __post_init__(self) -> None:
        _check(self.order >= 1, "text_ngram.order", self.order, "must be a positive integer")
        _check(0 < self.discount < 1, "text_ngram.discount", self.discount, "must be in (0, 1)")
        _check(self.k > 0, "text_ngram.k", self.k, "must be > 0")


@dataclass(frozen=True)
class LMTrainParams(TrainParams):
    """What training either language model takes beyond the base trainer's keys: the defaults of the text
    track's transformers, and `mdm_eps`, the smallest masking probability of the LLaDA objective."""

    batch_size: int = 16
    base_lr: float = 4.0e-2
    warmup_epochs: float = 0.1
    weight_decay: float = 0.1
    adam_beta2: float = 0.99
    clip_grad: float | None = 1.0
    mdm_eps: float = 1.0e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(0 < self.mdm_eps < 1, f"{self.section}.mdm_eps", self.mdm_eps, "must be in (0, 1)")


@dataclass(frozen=True)
class TextPretrainParams(LMTrainParams):
    """Language-model pretraining of the transformer: `ar` (next token) or `mdm` (LLaDA masked diffusion).

    An epoch is one pass over the training tokens in windows of `text_model.seq_len`; `batch_size` counts
    windows. `mtp_depth` > 0 trains DeepSeek-V3's multi-token prediction modules beside an `ar` model (weight
    `mtp_weight`; `mdm` predicts every masked position at once and has none); they are not exported. `hparams:
    auto` replaces `batch_size` and the lr by DeepSeek LLM's compute-budget laws (`pipeline_lib.text.hparams`) at
    `compute_budget` FLOPs (null: the run's own, FLOPs per token x training tokens).
    """

    section: ClassVar[str] = "text_pretrain"

    epochs: int = 6
    mtp_depth: int = 0
    mtp_weight: float = 0.3
    hparams: HparamsMode = "manual"
    compute_budget: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.mtp_depth >= 0, "text_pretrain.mtp_depth", self.mtp_depth, "must be an integer >= 0 (0: off)")
        _check(self.mtp_weight > 0, "text_pretrain.mtp_weight", self.mtp_weight, "must be > 0")
        if self.compute_budget is not None:
            _check(self.hparams == "auto", "text_pretrain.compute_budget", self.compute_budget,
                   "is only read with text_pretrain.hparams='auto'; set it to null")
            _check(self.compute_budget > 0, "text_pretrain.compute_budget", self.compute_budget,
                   "must be > 0 FLOPs, or null (the run's own: FLOPs per token x training tokens)")


@dataclass(frozen=True)
class TextEvaluateParams:
    """Validation scoring and samples of the text track's language models."""

    mdm_samples: int = 4
    prompt_tokens: int = 16
    sample_tokens: int = 100
    temperature: float = 0.8
    block_length: int = 16

    def __post_init__(self) -> None:
        for name in ("mdm_samples", "prompt_tokens", "sample_tokens", "block_length"):
            _check(getattr(self, name) >= 1, f"text_evaluate.{name}", getattr(self, name),
                   "must be a positive integer")
        _check(self.temperature >= 0, "text_evaluate.temperature", self.temperature, "must be >= 0 (0: greedy)")


TaskSource = Literal["generate", "jsonl"]
TaskKind = Literal["addition", "reversal", "countdown"]
TaskChecker = Literal["auto", "exact", "numeric", "countdown"]
TextReward = Literal["accuracy", "format", "combined"]
Aggregation = Literal["token", "sample"]


@dataclass(frozen=True)
class TextTaskParams:
    """The verifiable task the language models are finetuned on and post-trained against (`pipeline_lib.text.tasks`).

    `generate` draws `train_size` + `rl_size` + `test_size` distinct prompts of `kind` with `seed` (options:
    `digits` for addition, `min_len`/`max_len` for reversal, `max_number` for countdown); `jsonl` reads the three
    files (one ``{"prompt": ..., "answer": ...}`` per line) and needs a declared `checker`. A completion is the
    answer in ``<answer>...</answer>`` tags and an end-of-sequence token, at most `answer_tokens` tokens.
    """

    source: TaskSource = "generate"
    kind: TaskKind = "addition"
    digits: int = 2
    min_len: int = 3
    max_len: int = 8
    max_number: int = 20
    train_size: int = 4000
    rl_size: int = 1000
    test_size: int = 512
    train_path: str | None = None
    rl_path: str | None = None
    test_path: str | None = None
    checker: TaskChecker = "auto"
    answer_tokens: int = 8

    def __post_init__(self) -> None:
        for name in ("train_size", "rl_size", "test_size", "answer_tokens"):
            _check(getattr(self, name) >= 1, f"text_task.{name}", getattr(self, name), "must be a positive integer")
        for name in ("train_path", "rl_path", "test_path"):
            value = getattr(self, name)
            if self.source == "jsonl":
                _check(bool(value), f"text_task.{name}", value, "is required with text_task.source='jsonl'")
            else:
                _check(value is None, f"text_task.{name}", value,
                       "is only read with text_task.source='jsonl'; set it to null")
        _check(self.source == "generate" or self.checker != "auto", "text_task.checker", self.checker,
               "must be declared (exact, numeric or countdown) with text_task.source='jsonl'")


@dataclass(frozen=True)
class TextSFTParams(LMTrainParams):
    """Supervised finetuning of a language model on the task's train split: the answer tokens only for `ar`,
    LLaDA's SFT (the prompt never masked) for `mdm`. The from-scratch baseline has the same budget."""

    section: ClassVar[str] = "text_sft"

    epochs: int = 4


@dataclass(frozen=True)
class TextRLParams(TrainParams):
    """GRPO of a finetuned language model on the task's `rl` split against a rule reward (`losses.grpo`).

    `batch_size` counts prompts; each gets `group_size` completions sampled at `temperature` (`mdm`: LLaDA's
    sampler in blocks of `block_length`). `reward`: `accuracy` (1 right), `format` (1 well formed) or
    `combined` (TinyZero: 0 malformed, `format_score` well formed but wrong, 1 right). For `mdm` the
    log-probabilities are d1's one-pass estimate, each prompt token masked with `prompt_mask_prob`.
    """

    section: ClassVar[str] = "text_rl"

    epochs: int = 3
    batch_size: int = 16
    base_lr: float = 4.0e-3
    warmup_epochs: float = 0.0
    weight_decay: float = 0.0
    adam_beta2: float = 0.99
    clip_grad: float | None = 1.0
    group_size: int = 8
    temperature: float = 1.0
    block_length: int = 8
    reward: TextReward = "combined"
    format_score: float = 0.1
    scale_rewards: RewardScale = "group"
    epsilon: float = 0.2
    epsilon_high: float = 0.28
    num_iterations: int = 1
    beta: float = 0.04
    aggregation: Aggregation = "token"
    prompt_mask_prob: float = 0.15
    samples_every: int = 20
    log_every: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.group_size >= 2, "text_rl.group_size", self.group_size,
               "must be >= 2 (advantages are relative to the group)")
        _check(self.temperature > 0, "text_rl.temperature", self.temperature,
               "must be > 0 (greedy completions of a prompt would all be the same)")
        _check(self.block_length >= 1, "text_rl.block_length", self.block_length, "must be a positive integer")
        _check(0 <= self.format_score < 1, "text_rl.format_score", self.format_score,
               "must be in [0, 1) (a right answer earns 1)")
        _check(0 < self.epsilon < 1, "text_rl.epsilon", self.epsilon, "must be in (0, 1)")
        _check(self.epsilon_high >= self.epsilon, "text_rl.epsilon_high", self.epsilon_high,
               f"must be >= text_rl.epsilon={self.epsilon} (clip-higher widens only the upper side)")
        _check(self.num_iterations >= 1, "text_rl.num_iterations", self.num_iterations, "must be a positive integer")
        _check(self.beta >= 0, "text_rl.beta", self.beta, "must be >= 0 (0: no KL penalty)")
        _check(0 <= self.prompt_mask_prob < 1, "text_rl.prompt_mask_prob", self.prompt_mask_prob, "must be in [0, 1)")
        _check(self.samples_every >= 1, "text_rl.samples_every", self.samples_every, "must be a positive integer")


@dataclass(frozen=True)
class TextTaskEvaluateParams:
    """Test-split scoring of the task models: greedy exact match and format rate, and pass@k from `pass_k`
    samples per prompt at `temperature` (`mdm`: LLaDA's low-confidence sampler in blocks of `block_length`)."""

    pass_k: int = 4
    temperature: float = 1.0
    block_length: int = 8

    def __post_init__(self) -> None:
        for name in ("pass_k", "block_length"):
            _check(getattr(self, name) >= 1, f"text_task_evaluate.{name}", getattr(self, name),
                   "must be a positive integer")
        _check(self.temperature > 0, "text_task_evaluate.temperature", self.temperature,
               "must be > 0 (pass@k needs distinct samples)")


@dataclass(frozen=True)
class Params:
    """The whole `params.yaml`."""

    seed: int = 0
    device: Device = "auto"
    tracking: TrackingParams = dataclasses.field(default_factory=TrackingParams)
    data: DataParams = dataclasses.field(default_factory=DataParams)
    model: ModelParams = dataclasses.field(default_factory=ModelParams)
    pretrain: PretrainParams = dataclasses.field(default_factory=PretrainParams)
    finetune: FinetuneParams = dataclasses.field(default_factory=FinetuneParams)
    evaluate: EvaluateParams = dataclasses.field(default_factory=EvaluateParams)
    rl: RLParams = dataclasses.field(default_factory=RLParams)
    promote: PromoteParams = dataclasses.field(default_factory=PromoteParams)
    text_data: TextDataParams = dataclasses.field(default_factory=TextDataParams)
    text_ngram: TextNGramParams = dataclasses.field(default_factory=TextNGramParams)
    text_model: TextModelParams = dataclasses.field(default_factory=TextModelParams)
    text_pretrain: TextPretrainParams = dataclasses.field(default_factory=TextPretrainParams)
    text_evaluate: TextEvaluateParams = dataclasses.field(default_factory=TextEvaluateParams)
    text_task: TextTaskParams = dataclasses.field(default_factory=TextTaskParams)
    text_sft: TextSFTParams = dataclasses.field(default_factory=TextSFTParams)
    text_rl: TextRLParams = dataclasses.field(default_factory=TextRLParams)
    text_task_evaluate: TextTaskEvaluateParams = dataclasses.field(default_factory=TextTaskEvaluateParams)

    def __post_init__(self) -> None:
        _check(0 <= self.seed < 2**32, "seed", self.seed, "must be an integer in [0, 2**32)")
        self._check_encoder_input()
        self._check_mae_widths()

    def _check_encoder_input(self) -> None:
        """The custom ViT's patches must tile the images, where params alone say their size (`data_image_side`).

        Only the case the params decide: `vit` at its data's size (`model.img_size` null; an `img_size` is
        checked against `patch_size` by `ModelParams`, and compound scaling rounds the resolution to whole
        patches). A timm model name, whose ViT-ness only timm knows, and an imagefolder of unknown size are
        checked by the pretrain and finetune stages once the data is fetched
        (`pipeline_lib.models.factory.check_encoder_input`), before their MLflow runs.
        """
        model, side = self.model, data_image_side(self.data)
        if model.name == "vit" and model.img_size is None and model.compound_phi == 0 and side is not None:
            assert model.patch_size is not None  # ModelParams requires it for vit
            check_patch_size(model.patch_size, side, data_origin(self.data.source))

    def _check_mae_widths(self) -> None:
        """MAE's 2D sin-cos position embeddings split the encoder's and the decoder's width in four
        (`pipeline_lib.models.mae.sincos_pos_embed`); compound scaling rounds a scaled `vit` width to a multiple
        of 4 itself, and a timm ViT name keeps its own width."""
        if self.pretrain.method != "mae":
            return
        for key, width in (("pretrain.decoder_embed_dim", self.pretrain.decoder_embed_dim),
                           ("model.embed_dim", self.model.embed_dim)):
            if key == "model.embed_dim" and (self.model.name != "vit" or self.model.compound_phi != 0):
                continue
            _check(width % 4 == 0, key, width, "must be a multiple of 4 with pretrain.method='mae' (its 2D sin-cos "
                   "position embedding splits the width into four parts)")


# Side of the square images each source prepares (`pipeline_lib.data.sources`); imagefolder: `data.image_size`.
IMAGE_SIDES: dict[str, int] = {"digits": 8, "cifar10": 32, "stl10": 96}


def data_image_side(data: DataParams) -> int | None:
    """Side of the prepared images as params alone say it; None where only the fetched data knows (an
    imagefolder without `data.image_size` keeps its images' own size)."""
    return IMAGE_SIDES.get(data.source, data.image_size)


def data_origin(source: str) -> str:
    """How an error names where the image size comes from."""
    return f"data.source {source!r}" + (" resized by data.image_size" if source == "imagefolder" else "")


def check_patch_size(patch_size: int | None, side: int, origin: str, *, own_patch: int | None = None) -> None:
    """A ViT cuts its input of side `side` into whole patches: refuse a patch side that does not divide it.

    Args:
        patch_size: `model.patch_size` (None: a timm ViT keeps its own, `own_patch`).
        side: the input side the encoder is built for.
        origin: where `side` comes from, for the message (`data.source 'digits'`, `model.img_size`).
        own_patch: the timm model's own patch side, used when `patch_size` is None.

    Raises:
        ConfigError: naming `model.patch_size`, the sides accepted, and the other way out (`model.img_size`).
    """
    patch = own_patch if patch_size is None else patch_size
    assert patch is not None, "a null model.patch_size needs the timm model's own patch size"
    if side % patch:
        accepted = ", ".join(str(divisor) for divisor in range(1, side + 1) if side % divisor == 0)
        kept = "" if patch_size is not None else f"(null: the timm model's own patch size {patch}) "
        _fail("model.patch_size", patch_size, f"{kept}must divide the image size {side} of {origin} "
              f"(accepted: {accepted}); or set model.img_size to a multiple of {patch}")


def load_params(path: str | Path, overrides: Sequence[str] = ()) -> Params:
    """Read and validate a params file; raise `ConfigError` naming the first bad key.

    An empty file is refused: it is far more likely a truncated or wrong file than a wish for defaults, and
    `dvc repro` needs every key a stage declares anyway. A key or section left out takes its default.

    `overrides` are `section.key=value` assignments applied first, as `dvc exp run -S` applies them (the
    value parsed as YAML), for tools that try params without editing the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if raw is None or raw == {}:
        raise ConfigError(f"{path}: the params file is empty; every stage reads its keys from it (DVC tracks them "
                          "key by key), so start from the project's params.yaml, which lists every key")
    for assignment in overrides:
        key, equals, value = assignment.partition("=")
        if not equals or not key:
            raise ConfigError(f"{assignment!r}: an override is section.key=value")
        *sections, name = key.split(".")
        target = raw
        for section in sections:  # a section that is null (a gate not declared) becomes a mapping
            if not isinstance(target.get(section), dict):
                target[section] = {}
            target = target[section]
        target[name] = yaml.safe_load(value)
    return params_from_dict(raw)


def params_from_dict(raw: Mapping[str, Any]) -> Params:
    """Build `Params` from an already-parsed mapping (the YAML document)."""
    return _build(Params, raw, prefix="")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    section = prefix.rstrip(".") or "params"
    if not isinstance(raw, Mapping):
        _fail(section, raw, "must be a mapping of keys to values")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else ""
            raise ConfigError(f"{prefix}{key}: unknown key; accepted keys: {', '.join(fields)}{hint}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _convert(hints[name], raw[name], f"{prefix}{name}") for name in fields if name in raw}
    return cls(**kwargs)


def _convert(annotation: Any, value: Any, key: str) -> Any:
    """Check `value` against a field annotation; ints widen to floats, nothing else is coerced."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None and len(options) < len(typing.get_args(annotation)):
            return None
        if len(options) == 1:
            return _convert(options[0], value, key)
        for option in options:
            if typing.get_origin(option) is list and isinstance(value, list):
                return _convert(option, value, key)  # a list's own error names the bad item: the clearest
            try:
                return _convert(option, value, key)
            except ConfigError:
                continue
        _fail(key, value, f"must be {' or '.join(_describe(option) for option in options)}")
    if origin is list:
        (inner,) = typing.get_args(annotation)
        _check(isinstance(value, list), key, value, f"must be {_describe(annotation)}")
        return [_convert(inner, item, f"{key}[{index}]") for index, item in enumerate(value)]
    if origin is Literal:
        choices = typing.get_args(annotation)
        _check(value in choices, key, value, f"must be one of {', '.join(map(repr, choices))}")
        return value
    if dataclasses.is_dataclass(annotation):  # a section left empty (`data:`) takes every default
        return _build(annotation, {} if value is None else value, prefix=f"{key}.")
    if annotation is bool:
        _check(isinstance(value, bool), key, value, "must be true or false")
    elif annotation is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, value, "must be an integer")
    elif annotation is float:
        if isinstance(value, str) and _looks_numeric(value):
            _fail(key, value, "must be a number; YAML reads '1e-4' as text, write 1.0e-4")
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key, value, "must be a number")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        _check(math.isfinite(number), key, value, "must be a finite number")
        return number
    elif annotation is str:
        _check(isinstance(value, str), key, value, "must be a string")
    else:  # pragma: no cover - a new field type needs a branch here
        raise TypeError(f"{key}: unsupported annotation {annotation!r}")
    return value


def _describe(annotation: Any, *, plural: bool = False) -> str:
    """How an error names a field type: 'a number', 'a list of lists of numbers', ..."""
    if typing.get_origin(annotation) is list:
        inner = _describe(typing.get_args(annotation)[0], plural=True)
        return f"lists of {inner}" if plural else f"a list of {inner}"
    names = {float: ("a number", "numbers"), int: ("an integer", "integers"), str: ("a string", "strings"),
             bool: ("true or false", "booleans")}
    return names.get(annotation, (str(annotation), str(annotation)))[plural]


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def flatten(section: Any, prefix: str = "") -> dict[str, Any]:
    """A dataclass or mapping as flat dotted keys, the form MLflow's compare view lines up across runs."""
    mapping = dataclasses.asdict(section) if dataclasses.is_dataclass(section) else dict(section)
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


def params_hash(values: Mapping[str, Any]) -> str:
    """Stable sha256 of flat params: equal params give equal hashes across runs and machines."""
    canonical = json.dumps(dict(values), sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
