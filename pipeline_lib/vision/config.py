"""The vision track's params sections: data, model, pretrain, finetune, evaluate, rl (validated on load)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Literal

from pipeline_lib.core.config import _SHA256, CoreParams, GRPOParams, RewardScale, TrainParams, _check, _fail

DataSource = Literal["digits", "cifar10", "stl10", "imagefolder"]


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
    moves to the timm variant nearest the scaled multipliers (`pipeline_lib.vision.models.compound`). The stages
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


RewardType = Literal["accuracy", "cost_matrix", "abstain"]




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
class RLParams(GRPOParams):
    """GRPO post-training of the finetuned classifier on the `rl` split (see `pipeline_lib.core.grpo`).

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
    scale_rewards: RewardScale = "none"
    head_only: bool = False


# Side of the square images each source prepares (`pipeline_lib.vision.data.sources`); imagefolder: `data.image_size`.
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


@dataclass(frozen=True)
class VisionParams(CoreParams):
    """The vision track's view of `params.yaml`: the core sections and data, model, pretrain, finetune,
    evaluate and rl, with the checks that span them."""

    data: DataParams = dataclasses.field(default_factory=DataParams)
    model: ModelParams = dataclasses.field(default_factory=ModelParams)
    pretrain: PretrainParams = dataclasses.field(default_factory=PretrainParams)
    finetune: FinetuneParams = dataclasses.field(default_factory=FinetuneParams)
    evaluate: EvaluateParams = dataclasses.field(default_factory=EvaluateParams)
    rl: RLParams = dataclasses.field(default_factory=RLParams)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_encoder_input()
        self._check_mae_widths()

    def _check_encoder_input(self) -> None:
        """The custom ViT's patches must tile the images, where params alone say their size (`data_image_side`).

        Only the case the params decide: `vit` at its data's size (`model.img_size` null; an `img_size` is
        checked against `patch_size` by `ModelParams`, and compound scaling rounds the resolution to whole
        patches). A timm model name, whose ViT-ness only timm knows, and an imagefolder of unknown size are
        checked by the pretrain and finetune stages once the data is fetched
        (`pipeline_lib.vision.models.factory.check_encoder_input`), before their MLflow runs.
        """
        model, side = self.model, data_image_side(self.data)
        if model.name == "vit" and model.img_size is None and model.compound_phi == 0 and side is not None:
            assert model.patch_size is not None  # ModelParams requires it for vit
            check_patch_size(model.patch_size, side, data_origin(self.data.source))

    def _check_mae_widths(self) -> None:
        """MAE's 2D sin-cos position embeddings split the encoder's and the decoder's width in four
        (`pipeline_lib.vision.models.mae.sincos_pos_embed`); compound scaling rounds a scaled `vit` width to a multiple
        of 4 itself, and a timm ViT name keeps its own width."""
        if self.pretrain.method != "mae":
            return
        for key, width in (("pretrain.decoder_embed_dim", self.pretrain.decoder_embed_dim),
                           ("model.embed_dim", self.model.embed_dim)):
            if key == "model.embed_dim" and (self.model.name != "vit" or self.model.compound_phi != 0):
                continue
            _check(width % 4 == 0, key, width, "must be a multiple of 4 with pretrain.method='mae' (its 2D sin-cos "
                   "position embedding splits the width into four parts)")
