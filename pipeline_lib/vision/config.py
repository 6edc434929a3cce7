"""The vision track's params sections: data, model, pretrain, finetune, semi, evaluate, rl (validated on load)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Literal

from pipeline_lib.core.config import (
    _SHA256,
    CoreParams,
    GRPOParams,
    RewardScale,
    Section,
    TrainParams,
    _fail,
    bounded,
    unbounded,
)

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
class DataParams(Section):
    """What the fetch stage downloads or reads and how it splits it (see the data contract in the README)."""

    section: ClassVar[str] = "data"

    source: DataSource = "digits"
    url: str | None = None
    sha256: str | None = None
    path: str | None = None
    image_size: int | None = bounded(None, ">= 1")
    label_fraction: float = bounded(0.1, "(0, 1]")
    rl_fraction: float = bounded(0.1, "[0, 1)")  # and label_fraction + rl_fraction <= 1
    test_fraction: float = bounded(0.2, "(0, 1)")
    max_images: int | None = bounded(None, ">= 1")

    def __post_init__(self) -> None:
        super().__post_init__()
        label, rl = self.dotted("label_fraction"), self.dotted("rl_fraction")
        self.require(self.label_fraction + self.rl_fraction <= 1.0, "rl_fraction",
                     f"{label} + {rl} = {self.label_fraction} + {self.rl_fraction} must be <= 1 (the labeled and rl "
                     "splits are disjoint); lower one, e.g. rl_fraction 0 with label_fraction 1")
        if self.image_size is not None:
            self.require(self.source == "imagefolder", "image_size",
                         f"only the imagefolder source resizes images; remove it for source {self.source!r}")
        if self.sha256 is not None:
            self.require(bool(_SHA256.fullmatch(self.sha256)), "sha256", "must be 64 hexadecimal characters")
        self._check_location()

    def _check_location(self) -> None:
        """Each source takes its images from exactly one place: bundled, an official URL, a mirror, a folder."""
        url, path = self.dotted("url"), self.dotted("path")
        if self.source == "digits":
            for name in ("url", "sha256", "path"):
                self.require(getattr(self, name) is None, name, "must be null for source 'digits' (bundled data)")
            return
        self.require(self.url is not None or self.sha256 is None, "sha256",
                     f"is only set together with {url} (it is the digest of the archive to download)")
        if self.url is not None:
            self.require(self.sha256 is not None, "sha256",
                         f"is required with {url}={self.url!r}: downloads are verified before use")
        if self.source in OFFICIAL_ARCHIVES:
            self.require(self.path is None, "path", f"must be null for source {self.source!r}")
            return
        self.require((self.url is None) != (self.path is None), "path",
                     f"source 'imagefolder' needs exactly one of {path} (a local folder) or {url} (an archive)")

    @property
    def archive(self) -> tuple[str, str] | None:
        """(url, sha256) to download, or None for bundled data and local folders."""
        if self.url is not None:
            assert self.sha256 is not None
            return self.url, self.sha256.lower()
        return OFFICIAL_ARCHIVES.get(self.source)


@dataclass(frozen=True)
class ModelParams(Section):
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

    section: ClassVar[str] = "model"
    compound_models: ClassVar[tuple[str, ...]] = ("vit", *(f"efficientnet_b{i}" for i in range(8)))

    name: str = "vit"
    img_size: int | None = bounded(None, ">= 1")  # and a multiple of patch_size
    patch_size: int | None = bounded(2, ">= 1")  # required for vit
    embed_dim: int = bounded(64, ">= 1")
    depth: int = bounded(4, ">= 1")
    num_heads: int = bounded(4, ">= 1")  # and divides embed_dim
    global_pool: GlobalPool = "avg"
    compound_phi: float = bounded(0.0, ">= 0", "0: no scaling")
    compound_alpha: float = bounded(1.2, ">= 1", "a multiplier per unit of compound_phi")
    compound_beta: float = bounded(1.1, ">= 1", "a multiplier per unit of compound_phi")
    compound_gamma: float = bounded(1.15, ">= 1", "a multiplier per unit of compound_phi")

    def __post_init__(self) -> None:
        super().__post_init__()
        name, patch_size = self.dotted("name"), self.dotted("patch_size")
        self.require(bool(self.name.strip()), "name", "must be 'vit' or a timm model name")
        self.require(self.compound_phi == 0 or self.name in self.compound_models, "compound_phi",
                     f"compound scaling supports {name} {', '.join(self.compound_models)}; {name}={self.name!r} "
                     f"is none of them (set {self.dotted('compound_phi')} to 0)")
        self.require(self.name != "vit" or self.patch_size is not None, "patch_size", f"is required for {name}='vit'")
        if self.img_size is not None:
            self.require(self.patch_size is None or self.img_size % self.patch_size == 0, "img_size",
                         f"must be a multiple of {patch_size}={self.patch_size}")
        self.require(self.embed_dim % self.num_heads == 0, "num_heads",
                     f"must divide {self.dotted('embed_dim')}={self.embed_dim}")


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
    mask_ratio: float = bounded(0.5, "(0, 1)")
    norm_pix_loss: bool = False
    decoder_embed_dim: int = bounded(64, ">= 1")
    decoder_depth: int = bounded(2, ">= 1")
    decoder_num_heads: int = bounded(4, ">= 1")  # and divides decoder_embed_dim
    # contrastive
    loss: ContrastiveLoss = "nt_xent"
    temperature: float = bounded(0.2, "> 0")
    margin: float = bounded(1.0, "> 0")
    projection_dim: int = bounded(128, ">= 1")
    hidden_dim: int = bounded(512, ">= 1")
    momentum: float = bounded(0.99, "[0, 1)")
    # augmentations (all methods)
    crop_scale_min: float = bounded(0.5, "(0, 1]")
    flip_p: float = bounded(0.0, "[0, 1]")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require(self.decoder_embed_dim % self.decoder_num_heads == 0, "decoder_num_heads",
                     f"must divide {self.dotted('decoder_embed_dim')}={self.decoder_embed_dim}")
        self.require(self.method != "mocov3" or self.loss == "nt_xent", "loss",
                     f"mocov3 has its own symmetric InfoNCE loss; {self.dotted('loss')} applies to simclr only "
                     "(leave it nt_xent)")


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
    layer_decay: float = bounded(0.75, "(0, 1]", "1: off")
    label_smoothing: float = bounded(0.1, "[0, 1)")
    crop_scale_min: float = bounded(0.7, "(0, 1]", "1: no cropping")
    flip_p: float = bounded(0.0, "[0, 1]")
    mixup_alpha: float = bounded(0.0, ">= 0", "0: off")
    cutmix_alpha: float = bounded(0.0, ">= 0", "0: off")
    mixup_prob: float = bounded(1.0, "[0, 1]")

    def __post_init__(self) -> None:
        super().__post_init__()
        micro = self.batch_size // self.accumulation_steps
        self.require(not self.mixes or micro % 2 == 0, "batch_size", "mixup/cutmix pair each image with another in "
                     f"its micro-batch, so batch_size / accumulation_steps = {micro} must be even")

    @property
    def mixes(self) -> bool:
        """Whether mixup or cutmix is on."""
        return self.mixup_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)


@dataclass(frozen=True)
class ScratchFinetuneParams(FinetuneParams):
    """The recipe of the from-scratch baseline (the `finetune_scratch` stage): the `finetune` section with the keys
    given here over it. Random weights need their own budget: choose it by cross-validation on the labeled split
    (`benchmarks/finetune_cv.py --scratch`), as the pretrained recipe is chosen, so that the gain measures
    pretraining and not a baseline stopped early."""

    section: ClassVar[str] = "finetune_scratch"
    inherits: ClassVar[str] = "finetune"

    epochs: int = 500  # by CV on labeled (the default data, 10% labels): 100 -> 0.583, 300 -> 0.795, 500 -> 0.861


SemiMethod = Literal["fixmatch", "distill", "none"]
SemiInit = Literal["finetuned", "encoder"]


@dataclass(frozen=True)
class SemiParams(TrainParams):
    """The semi-supervised step after finetuning: the labeled split and the unlabeled one train one classifier.

    `fixmatch` (Sohn et al. 2020): the model's own prediction on a weak view of each unlabeled image, where its
    confidence reaches `threshold`, is the target of a strong view (a random affine map and cutout), weighted by
    `unlabeled_weight`, beside the labeled cross-entropy. `distill` (SimCLRv2's third step, Chen et al. 2020): the
    frozen finetuned classifier's predictions at `temperature` are the soft targets of every unlabeled image.
    `none`: models/semi is the finetuned classifier as it is. The student starts from the finetuned classifier
    (`init: finetuned`) or from the pretrained encoder with a new head (`encoder`). An epoch is a pass over the
    unlabeled split, `batch_size` unlabeled images a step, each step with `labeled_batch_size` labeled ones.
    """

    section: ClassVar[str] = "semi"

    method: SemiMethod = "fixmatch"
    init: SemiInit = "finetuned"
    epochs: int = 30
    batch_size: int = 128
    labeled_batch_size: int = bounded(32, ">= 1", "labeled images a step, beside batch_size unlabeled ones")
    base_lr: float = 1.0e-2
    adam_beta2: float = 0.999
    warmup_epochs: float = 0.0
    drop_path_rate: float = 0.1
    layer_decay: float = bounded(0.75, "(0, 1]", "1: off")
    label_smoothing: float = bounded(0.0, "[0, 1)")  # fixmatch: caps the confidence the threshold needs
    threshold: float = bounded(0.95, "(0, 1]")
    unlabeled_weight: float = bounded(1.0, ">= 0")
    temperature: float = bounded(1.0, "> 0")
    crop_scale_min: float = bounded(0.7, "(0, 1]", "1: no cropping")  # the weak view (and the labeled images)
    strong_rotation: float = bounded(30.0, "[0, 180]", "degrees")
    strong_shift: float = bounded(0.25, "[0, 1]", "fraction of the side")
    strong_scale_min: float = bounded(0.8, "> 0")
    strong_scale_max: float = bounded(1.2, "> 0")
    strong_shear: float = bounded(20.0, "[0, 60]", "degrees")
    cutout_min: float = bounded(0.125, "[0, 1]", "fraction of the side; 0 with cutout_max 0: off")
    cutout_max: float = bounded(0.5, "[0, 1]")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require(self.strong_scale_min <= self.strong_scale_max, "strong_scale_max",
                     f"must be at least {self.dotted('strong_scale_min')}={self.strong_scale_min}")
        self.require(self.cutout_min <= self.cutout_max, "cutout_max",
                     f"must be at least {self.dotted('cutout_min')}={self.cutout_min}")
        self.require(self.labeled_batch_size % self.accumulation_steps == 0, "labeled_batch_size",
                     f"must be a multiple of {self.dotted('accumulation_steps')}={self.accumulation_steps}")

    def confidence_cap(self, num_classes: int) -> float:
        """The largest probability the labeled loss's optimum gives a class: 1 - smoothing x (K - 1) / K."""
        return 1.0 - self.label_smoothing * (num_classes - 1) / num_classes

    def check_threshold(self, num_classes: int) -> None:
        """fixmatch: a label smoothing that keeps every confidence below the threshold leaves no pseudo-label."""
        cap = self.confidence_cap(num_classes)
        self.require(self.method != "fixmatch" or cap >= self.threshold, "label_smoothing",
                     f"caps the confidence at {cap:.4f} over {num_classes} classes, below "
                     f"{self.dotted('threshold')}={self.threshold}: no pseudo-label would pass; lower one of them")


@dataclass(frozen=True)
class EvaluateParams(Section):
    """Test-split evaluation: calibration bins, the frozen-encoder probes (kNN, logistic regression) and the
    pixel baselines (logistic regression, an RBF SVM)."""

    section: ClassVar[str] = "evaluate"

    calibration_bins: int = bounded(15, ">= 1")
    knn_k: int = bounded(20, ">= 1")
    knn_temperature: float = bounded(0.07, "> 0")
    probe_c: float = bounded(1.0, "> 0", "inverse L2 strength of the logistic-regression probe")
    baseline_folds: int = bounded(4, ">= 2", "stratified CV folds choosing the pixel SVM's C and gamma on labeled")


RewardType = Literal["accuracy", "cost_matrix", "abstain"]




@dataclass(frozen=True)
class RewardParams(Section):
    """What a classifier's decision is worth, declared, never learned (see `pipeline_lib.rewards`).

    `accuracy`: 1 right, 0 wrong. `abstain`: `correct`, `wrong` and `abstain` for the extra action.
    `cost_matrix`: minus `cost_matrix[true][predicted]`, given inline as rows or as the path of a CSV file
    with one row per true class; its shape is checked against the classes when the RL stage starts.
    """

    section: ClassVar[str] = "rl.reward"

    type: RewardType = "abstain"
    correct: float = unbounded(1.0, "any reward; with type abstain, above wrong and abstain: checked in __post_init__")
    wrong: float = unbounded(-1.0, "any reward; with type abstain, below correct: checked in __post_init__")
    abstain: float = unbounded(0.0, "any reward, at most correct: checked in __post_init__")
    cost_matrix: list[list[float]] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        correct, kind = f"{self.dotted('correct')}={self.correct}", self.dotted("type")
        if self.type == "abstain":
            self.require(self.wrong < self.correct, "wrong", f"must be below {correct}")
            self.require(self.abstain <= self.correct, "abstain",
                         f"must not exceed {correct} (abstaining would pay more than a right answer)")
        if self.type == "cost_matrix":
            self.require(self.cost_matrix is not None, "cost_matrix", f"is required with {kind}='cost_matrix': rows "
                         "of costs (true class x predicted class) or the path of a CSV file")
            if isinstance(self.cost_matrix, list):
                widths = {len(row) for row in self.cost_matrix}
                self.require(len(self.cost_matrix) > 0 and widths == {len(self.cost_matrix)}, "cost_matrix",
                             "must be a square matrix: one row per true class, one column per prediction")
        else:
            self.require(self.cost_matrix is None, "cost_matrix",
                         f"is only read with {kind}='cost_matrix'; remove it for type {self.type!r}")


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
    lr: float = 1.25e-3
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
    resized = f" resized by {DataParams.dotted('image_size')}" if source == "imagefolder" else ""
    return f"{DataParams.dotted('source')} {source!r}{resized}"


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
        _fail(ModelParams.dotted("patch_size"), patch_size, f"{kept}must divide the image size {side} of {origin} "
              f"(accepted: {accepted}); or set {ModelParams.dotted('img_size')} to a multiple of {patch}")


@dataclass(frozen=True)
class VisionParams(CoreParams):
    """The vision track's view of `params.yaml`: the core sections and data, model, pretrain, finetune,
    finetune_scratch, semi, evaluate and rl, with the checks that span them."""

    data: DataParams = dataclasses.field(default_factory=DataParams)
    model: ModelParams = dataclasses.field(default_factory=ModelParams)
    pretrain: PretrainParams = dataclasses.field(default_factory=PretrainParams)
    finetune: FinetuneParams = dataclasses.field(default_factory=FinetuneParams)
    finetune_scratch: ScratchFinetuneParams = dataclasses.field(default_factory=ScratchFinetuneParams)
    semi: SemiParams = dataclasses.field(default_factory=SemiParams)
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
        pretrain, model = self.pretrain, self.model
        if pretrain.method != "mae":
            return
        rule = (f"must be a multiple of 4 with {pretrain.dotted('method')}='mae' (its 2D sin-cos position embedding "
                "splits the width into four parts)")
        pretrain.require(pretrain.decoder_embed_dim % 4 == 0, "decoder_embed_dim", rule)
        if model.name == "vit" and model.compound_phi == 0:
            model.require(model.embed_dim % 4 == 0, "embed_dim", rule)
