"""`pipeline_lib.core.config`: the committed params, every rejection message, conversions, flatten and hashing,
and the declared bounds of every numeric key."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest

from pipeline_lib.core.config import (
    Bounds,
    GateParams,
    PromoteParams,
    Section,
    TrackingParams,
    TrainParams,
    declared_bounds,
    flatten,
    params_hash,
)
from pipeline_lib.core.errors import ConfigError
from pipeline_lib.params import Params, load_params, params_from_dict
from pipeline_lib.text.config import TextPretrainParams, TextRLParams, TextSFTParams
from pipeline_lib.vision.config import OFFICIAL_ARCHIVES, DataParams, FinetuneParams, PretrainParams, RLParams

REPO_PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"
SHA = "ab" * 32
MIRROR = "https://mirror.example/archive.tar.gz"


def _write(tmp_path: Path, text: str) -> Path:
    """Write `text` to a params file under `tmp_path` and return its path."""
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_committed_params_yaml_gives_documented_defaults() -> None:
    """The repository's params.yaml loads and equals the dataclass defaults it documents."""
    params = load_params(REPO_PARAMS)
    assert params == Params()
    assert params.seed == 0
    assert params.device == "auto"
    assert params.tracking == TrackingParams("ssl-pipeline", "ssl-pipeline-encoder", "ssl-pipeline-classifier")
    data = params.data
    assert data.source == "digits"
    assert (data.url, data.sha256, data.path, data.image_size, data.max_images) == (None,) * 5
    assert (data.label_fraction, data.rl_fraction, data.test_fraction) == (0.1, 0.1, 0.2)
    assert data.archive is None


# (yaml_text, expected): expected[0] is the message prefix (dotted key and offending value),
# the rest must appear somewhere in the message (what is accepted, hints).
BAD_INPUTS: list[tuple[str, list[str]]] = [
    # unknown keys
    (
        "dta:\n  source: digits\n",
        ["dta: unknown key", "accepted keys: seed, device, tracking, promote, data", "did you mean data?"],
    ),
    (
        "data:\n  label_frac: 0.5\n",
        ["data.label_frac: unknown key", "accepted keys: source, url", "did you mean data.label_fraction?"],
    ),
    # wrong types
    ('seed: "zero"\n', ["seed='zero'", "must be an integer"]),
    ("seed: 1.5\n", ["seed=1.5", "must be an integer"]),
    ("data:\n  max_images: true\n", ["data.max_images=True", "must be an integer"]),
    ("data: [1]\n", ["data=[1]", "must be a mapping of keys to values"]),
    ("tracking: [a]\n", ["tracking=['a']", "must be a mapping of keys to values"]),
    ("- 1\n", ["params=[1]", "must be a mapping of keys to values"]),
    ("tracking:\n  encoder_model: 5\n", ["tracking.encoder_model=5", "must be a string"]),
    ("data:\n  label_fraction: 1e-4\n", ["data.label_fraction='1e-4'", "must be a number", "write 1.0e-4"]),
    ("data:\n  rl_fraction: lots\n", ["data.rl_fraction='lots'", "must be a number"]),
    # out of range
    ("data:\n  label_fraction: 1.5\n", ["data.label_fraction=1.5: must be in (0, 1]"]),
    ("data:\n  label_fraction: 0\n", ["data.label_fraction=0.0", "must be in (0, 1]"]),
    ("data:\n  rl_fraction: 1.0\n", ["data.rl_fraction=1.0", "must be in [0, 1)"]),
    ("data:\n  rl_fraction: -0.1\n", ["data.rl_fraction=-0.1", "must be in [0, 1)"]),
    ("data:\n  test_fraction: 0\n", ["data.test_fraction=0.0", "must be in (0, 1)"]),
    ("data:\n  max_images: -3\n", ["data.max_images=-3", "must be a positive integer or null"]),
    ("seed: -1\n", ["seed=-1", "must be an integer in [0, 2**32)"]),
    ("seed: 4294967296\n", ["seed=4294967296", "must be an integer in [0, 2**32)"]),
    # invalid Literal
    ("data:\n  source: mnist\n", ["data.source='mnist'", "must be one of 'digits', 'cifar10', 'stl10', 'imagefolder'"]),
    ("device: tpu\n", ["device='tpu'", "must be one of 'auto', 'cpu', 'cuda', 'mps'"]),
    # cross-field rules
    (
        "data:\n  label_fraction: 0.6\n  rl_fraction: 0.5\n",
        ["data.rl_fraction=0.5", "data.label_fraction + data.rl_fraction = 0.6 + 0.5 must be <= 1", "0.6 + 0.5"],
    ),
    (f"data:\n  source: cifar10\n  url: {MIRROR}\n", ["data.sha256=None", f"is required with data.url={MIRROR!r}"]),
    (
        f"data:\n  source: cifar10\n  url: {MIRROR}\n  sha256: abc123\n",
        ["data.sha256='abc123'", "must be 64 hexadecimal characters"],
    ),
    (f"data:\n  source: stl10\n  sha256: {SHA}\n", [f"data.sha256={SHA!r}", "only set together with data.url"]),
    ("data:\n  source: stl10\n  path: data/raw/stl\n", ["data.path='data/raw/stl'", "must be null for source 'stl10'"]),
    (
        f"data:\n  source: digits\n  url: {MIRROR}\n  sha256: {SHA}\n",
        [f"data.url={MIRROR!r}", "must be null for source 'digits'"],
    ),
    (
        "data:\n  source: imagefolder\n",
        ["data.path=None", "needs exactly one of data.path (a local folder) or data.url (an archive)"],
    ),
    (
        f"data:\n  source: imagefolder\n  path: data/raw/imgs\n  url: {MIRROR}\n  sha256: {SHA}\n",
        ["data.path='data/raw/imgs'", "needs exactly one of data.path"],
    ),
    (
        "data:\n  source: cifar10\n  image_size: 64\n",
        ["data.image_size=64", "only the imagefolder source resizes images", "source 'cifar10'"],
    ),
    (
        "data:\n  source: imagefolder\n  path: data/raw/imgs\n  image_size: 0\n",
        ["data.image_size=0", "must be a positive integer or null"],
    ),
    # tracking names
    ('tracking:\n  experiment: ""\n', ["tracking.experiment=''", "must be a non-empty name"]),
    ("tracking:\n  experiment: my run\n", ["tracking.experiment='my run'", "letters, digits, '.', '_' or '-'"]),
    # model and pretrain
    ("model:\n  patch_size: null\n", ["model.patch_size=None", "is required for model.name='vit'"]),
    ("model:\n  embed_dim: 30\n", ["model.num_heads=4", "must divide model.embed_dim=30"]),
    ("model:\n  img_size: 9\n", ["model.img_size=9", "multiple of model.patch_size=2"]),
    ("pretrain:\n  method: byol\n", ["pretrain.method='byol'", "'mae', 'simclr', 'mocov3'"]),
    ("pretrain:\n  batch_size: 100\n  accumulation_steps: 3\n",
     ["pretrain.batch_size=100", "multiple of pretrain.accumulation_steps=3"]),
    ("pretrain:\n  epochs: 2\n", ["pretrain.warmup_epochs=4.0", "must be in [0, pretrain.epochs=2]"]),
    ("pretrain:\n  mask_ratio: 1.0\n", ["pretrain.mask_ratio=1.0", "must be in (0, 1)"]),
    ("pretrain:\n  method: mocov3\n  loss: margin\n", ["pretrain.loss='margin'", "simclr only"]),
    ("pretrain:\n  clip_grad: 0\n", ["pretrain.clip_grad=0.0", "must be > 0 or null"]),
    ("pretrain:\n  precision: fp16\n", ["pretrain.precision='fp16'", "'auto', 'fp32', 'bf16'"]),
    ("model:\n  drop_path_rate: 0.1\n", ["model.drop_path_rate: unknown key", "global_pool"]),
    ("model:\n  global_pool: max\n", ["model.global_pool='max'", "must be one of 'token', 'avg'"]),
    ("pretrain:\n  drop_path_rate: 1.0\n", ["pretrain.drop_path_rate=1.0", "must be in [0, 1)"]),
    ("finetune:\n  mode: probe\n", ["finetune.mode='probe'", "'finetune', 'linear_probe'"]),
    ("finetune:\n  layer_decay: 0\n", ["finetune.layer_decay=0.0", "must be in (0, 1]"]),
    ("finetune:\n  label_smoothing: 1.0\n", ["finetune.label_smoothing=1.0", "must be in [0, 1)"]),
    ("finetune:\n  crop_scale_min: 0\n", ["finetune.crop_scale_min=0.0", "(1: no cropping)"]),
    ("finetune:\n  flip_p: 2\n", ["finetune.flip_p=2.0", "must be in [0, 1]"]),
    ("finetune:\n  mixup_alpha: -0.2\n", ["finetune.mixup_alpha=-0.2", "must be >= 0"]),
    ("finetune:\n  mixup_alpha: 0.8\n  batch_size: 30\n  accumulation_steps: 2\n",
     ["finetune.batch_size=30", "= 15 must be even"]),
    ("finetune:\n  epochs: 3\n", ["finetune.warmup_epochs=5.0", "must be in [0, finetune.epochs=3]"]),
    ("finetune:\n  min_lr: 1.0\n", ["finetune.min_lr=1.0", "must be in [0, finetune.base_lr]"]),
    ("evaluate:\n  knn_k: 0\n", ["evaluate.knn_k=0", "must be a positive integer"]),
    ("evaluate:\n  calibration_bins: 0\n", ["evaluate.calibration_bins=0", "must be a positive integer"]),
    ("evaluate:\n  probe_c: 0\n", ["evaluate.probe_c=0.0", "must be > 0"]),
    ("evaluate:\n  knn_temperature: -1\n", ["evaluate.knn_temperature=-1.0", "must be > 0"]),
    ("rl:\n  reward:\n    abstain: 1.5\n", ["rl.reward.abstain=1.5", "must not exceed rl.reward.correct=1.0"]),
    ("rl:\n  reward:\n    wrong: 1\n", ["rl.reward.wrong=1.0", "must be below rl.reward.correct=1.0"]),
    ("rl:\n  reward:\n    type: costs\n", ["rl.reward.type='costs'", "'accuracy', 'cost_matrix', 'abstain'"]),
    ("rl:\n  reward:\n    type: cost_matrix\n", ["rl.reward.cost_matrix=None", "is required"]),
    ("rl:\n  reward:\n    type: cost_matrix\n    cost_matrix: [[0, 1], [1]]\n",
     ["rl.reward.cost_matrix=[[0.0, 1.0], [1.0]]", "must be a square matrix"]),
    ("rl:\n  reward:\n    type: cost_matrix\n    cost_matrix: [[0, .nan], [1, 0]]\n",
     ["rl.reward.cost_matrix[0][1]=nan", "must be a finite number"]),
    ("rl:\n  reward:\n    type: cost_matrix\n    cost_matrix: 5\n",
     ["rl.reward.cost_matrix=5", "must be a list of lists of numbers or a string"]),
    ("rl:\n  reward:\n    type: accuracy\n    cost_matrix: [[0]]\n",
     ["rl.reward.cost_matrix=[[0.0]]", "only read with rl.reward.type='cost_matrix'"]),
    ("rl:\n  group_size: 1\n", ["rl.group_size=1", "must be >= 2"]),
    ("rl:\n  epsilon_high: 0.1\n", ["rl.epsilon_high=0.1", "must be >= rl.epsilon=0.2"]),
    ("rl:\n  beta: -0.1\n", ["rl.beta=-0.1", "must be >= 0"]),
    ("rl:\n  scale_rewards: std\n", ["rl.scale_rewards='std'", "'group', 'none'"]),
    ("rl:\n  num_iterations: 0\n", ["rl.num_iterations=0", "must be a positive integer"]),
    ("text_model:\n  moe:\n    top_k: 9\n", ["text_model.moe.top_k=9", "must be <= the 8 experts of the kept"]),
    ("text_model:\n  moe:\n    groups: 3\n", ["text_model.moe.groups=3", "must divide text_model.moe.routed_experts"]),
    ("text_model:\n  moe:\n    groups: 8\n", ["text_model.moe.groups=8", "at least 2 experts per group"]),
    ("text_model:\n  moe:\n    groups: 4\n    topk_groups: 5\n",
     ["text_model.moe.topk_groups=5", "must be <= text_model.moe.groups=4"]),
    ("text_model:\n  moe:\n    groups: 4\n    topk_groups: 1\n    top_k: 3\n",
     ["text_model.moe.top_k=3", "must be <= the 2 experts of the kept groups"]),
    ("text_model:\n  moe:\n    bias_update_speed: -1.0e-3\n", ["text_model.moe.bias_update_speed=-0.001", ">= 0"]),
    ("text_model:\n  moe:\n    enabled: true\n    dense_layers: 2\n",
     ["text_model.moe.dense_layers=2", "must be below text_model.n_layer=2"]),
    ("text_model:\n  moe:\n    expert_hidden: 0\n", ["text_model.moe.expert_hidden=0", "positive integer or null"]),
    ("text_model:\n  moe:\n    experts: 4\n", ["text_model.moe.experts: unknown key", "routed_experts"]),
    ("text_pretrain:\n  mtp_depth: -1\n", ["text_pretrain.mtp_depth=-1", "must be an integer >= 0"]),
    ("text_pretrain:\n  mtp_weight: 0\n", ["text_pretrain.mtp_weight=0.0", "must be > 0"]),
    ("text_pretrain:\n  hparams: law\n", ["text_pretrain.hparams='law'", "'manual', 'auto'"]),
    ("text_pretrain:\n  compute_budget: 1.0e+20\n",
     ["text_pretrain.compute_budget=1e+20", "only read with text_pretrain.hparams='auto'"]),
    ("text_pretrain:\n  hparams: auto\n  compute_budget: -1.0\n",
     ["text_pretrain.compute_budget=-1.0", "must be > 0 or null (in FLOPs"]),
]


@pytest.mark.parametrize(("yaml_text", "expected"), BAD_INPUTS, ids=[f"bad{i:02d}" for i in range(len(BAD_INPUTS))])
def test_bad_input_raises_config_error_naming_key(tmp_path: Path, yaml_text: str, expected: list[str]) -> None:
    """Each bad file raises ConfigError starting with key=value and saying what is accepted."""
    with pytest.raises(ConfigError) as info:
        load_params(_write(tmp_path, yaml_text))
    message = str(info.value)
    prefix, *rest = expected
    assert message.startswith(prefix), message
    for part in rest:
        assert part in message, message


def test_out_of_range_message_is_exact() -> None:
    """The docstring's example message is produced verbatim."""
    with pytest.raises(ConfigError) as info:
        params_from_dict({"data": {"label_fraction": 1.5}})
    assert str(info.value) == "data.label_fraction=1.5: must be in (0, 1]"


def test_missing_file(tmp_path: Path) -> None:
    """A params path that does not exist is a ConfigError naming the path."""
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="params file not found") as info:
        load_params(path)
    assert str(info.value).startswith(str(path))


def test_invalid_yaml(tmp_path: Path) -> None:
    """A YAML syntax error is a ConfigError naming the path, not a yaml exception."""
    path = _write(tmp_path, "data: [1, 2\nseed: 0\n")
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        load_params(path)
    assert str(info.value).startswith(str(path))


@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}\n"])
def test_empty_file_is_refused(tmp_path: Path, text: str) -> None:
    """An empty document is a truncated or wrong file far more often than a wish for defaults; DVC needs every
    key a stage declares anyway."""
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match="the params file is empty") as info:
        load_params(path)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_a_missing_section_takes_its_defaults(tmp_path: Path) -> None:
    assert load_params(_write(tmp_path, "seed: 0\n")) == Params()


@pytest.mark.parametrize("text", ["data:\n", "data: null\ntracking:\n"])
def test_empty_section_gives_defaults(tmp_path: Path, text: str) -> None:
    """A section left empty takes every default of that section."""
    assert load_params(_write(tmp_path, text)) == Params()


def test_int_widens_to_float(tmp_path: Path) -> None:
    """An int written for a float key becomes a float; nothing else is coerced."""
    params = load_params(_write(tmp_path, "data:\n  label_fraction: 1\n  rl_fraction: 0\n"))
    assert params.data.label_fraction == 1.0
    assert type(params.data.label_fraction) is float
    assert type(params.data.rl_fraction) is float


def test_dotted_float_form_is_accepted(tmp_path: Path) -> None:
    """The form the error message recommends, 1.0e-4, parses as a float."""
    params = load_params(_write(tmp_path, "data:\n  label_fraction: 1.0e-4\n"))
    assert params.data.label_fraction == pytest.approx(1e-4)


def test_null_for_optional_keys(tmp_path: Path) -> None:
    """null is accepted for optional keys and stays None."""
    text = "data:\n  url: null\n  sha256: null\n  path: null\n  image_size: null\n  max_images: null\n"
    data = load_params(_write(tmp_path, text)).data
    assert (data.url, data.sha256, data.path, data.image_size, data.max_images) == (None,) * 5


def test_imagefolder_with_path_and_image_size(tmp_path: Path) -> None:
    """A local image folder with a resize size is valid and needs no download."""
    text = "data:\n  source: imagefolder\n  path: data/raw/imgs\n  image_size: 32\n  max_images: 10\n"
    data = load_params(_write(tmp_path, text)).data
    assert (data.path, data.image_size, data.max_images) == ("data/raw/imgs", 32, 10)
    assert data.archive is None


@pytest.mark.parametrize("source", sorted(OFFICIAL_ARCHIVES))
def test_official_archive_without_url(tmp_path: Path, source: str) -> None:
    """With no url, an official source downloads its built-in (url, sha256)."""
    data = load_params(_write(tmp_path, f"data:\n  source: {source}\n")).data
    assert data.archive == OFFICIAL_ARCHIVES[source]


def test_mirror_archive_lowercases_sha(tmp_path: Path) -> None:
    """A mirror url with its own sha256 replaces the official archive; the digest is lowercased."""
    upper = "AB" * 32
    data = load_params(_write(tmp_path, f"data:\n  source: cifar10\n  url: {MIRROR}\n  sha256: {upper}\n")).data
    assert data.sha256 == upper
    assert data.archive == (MIRROR, upper.lower())


def test_flatten_dataclass_gives_dotted_keys() -> None:
    """flatten turns nested sections into dotted keys, leaving leaves as they are."""
    flat = flatten(Params())

    def leaves(section: object, prefix: str) -> set[str]:
        keys = set()
        for field in dataclasses.fields(section):
            value = getattr(section, field.name)
            nested = dataclasses.is_dataclass(value)
            keys |= leaves(value, f"{prefix}{field.name}.") if nested else {f"{prefix}{field.name}"}
        return keys

    assert set(flat) == leaves(Params(), "")
    assert flat["rl.reward.type"] == "abstain"  # sections within sections too
    assert "pretrain.section" not in flat  # class-level constants are not params
    assert flat["data.source"] == "digits"
    assert flat["tracking.experiment"] == "ssl-pipeline"
    assert flatten(DataParams(), prefix="data.")["data.label_fraction"] == 0.1


def test_params_hash_stable_and_sensitive() -> None:
    """Equal dicts hash equally whatever the key order; a changed value changes the hash."""
    flat = flatten(Params())
    reordered = dict(reversed(list(flat.items())))
    assert list(reordered) != list(flat)
    assert params_hash(reordered) == params_hash(flat)
    assert params_hash(flatten(load_params(REPO_PARAMS))) == params_hash(flat)
    changed = {**flat, "seed": 1}
    assert params_hash(changed) != params_hash(flat)
    assert len(params_hash(flat)) == 64


def test_cost_matrix_inline_or_as_a_path(tmp_path: Path) -> None:
    inline = "rl:\n  reward:\n    type: cost_matrix\n    cost_matrix: [[0, 2], [1, 0]]\n"
    assert load_params(_write(tmp_path, inline)).rl.reward.cost_matrix == [[0.0, 2.0], [1.0, 0.0]]
    path = "rl:\n  reward:\n    type: cost_matrix\n    cost_matrix: data/costs.csv\n"
    assert load_params(_write(tmp_path, path)).rl.reward.cost_matrix == "data/costs.csv"


def test_overrides_apply_like_dvc_exp_run_set_param(tmp_path: Path) -> None:
    path = _write(tmp_path, "finetune:\n  epochs: 3\n")
    params = load_params(path, ["finetune.epochs=7", "rl.reward.type=accuracy", "seed=5"])
    assert (params.finetune.epochs, params.rl.reward.type, params.seed) == (7, "accuracy", 5)
    with pytest.raises(ConfigError, match=r"an override is section\.key=value"):
        load_params(path, ["finetune.epochs"])
    with pytest.raises(ConfigError, match=r"finetune.epochs=0: must be a positive integer"):
        load_params(path, ["finetune.epochs=0"])


def test_params_are_frozen() -> None:
    """Params and its sections cannot be changed after validation."""
    params = Params()
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.seed = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.data.label_fraction = 0.5  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.tracking.experiment = "x"  # type: ignore[misc]


# Inputs that once slipped through: overflow, trailing newlines, non-mapping documents, stray digests.
EDGE_CASES: list[tuple[str, list[str]]] = [
    ("data:\n  label_fraction: 1" + "0" * 400 + "\n", ["data.label_fraction=", "must be a finite number"]),
    ("data:\n  label_fraction: .nan\n", ["data.label_fraction=nan", "must be a finite number"]),
    (f"data:\n  source: cifar10\n  url: {MIRROR}\n  sha256: |\n    {SHA}\n", ["data.sha256=", "64 hexadecimal"]),
    ("tracking:\n  experiment: |\n    ssl\n", ["tracking.experiment='ssl\\n'", "non-empty name"]),
    ("[]\n", ["params=[]", "must be a mapping"]),
    ("false\n", ["params=False", "must be a mapping"]),
    (
        f"data:\n  source: imagefolder\n  path: /data\n  sha256: {SHA}\n",
        ["data.sha256=", "only set together with data.url"],
    ),
]


@pytest.mark.parametrize(("yaml_text", "expected"), EDGE_CASES, ids=[f"edge{i}" for i in range(len(EDGE_CASES))])
def test_edge_cases_raise_config_error(tmp_path: Path, yaml_text: str, expected: list[str]) -> None:
    """Each edge case is refused with a message naming the key and the rule."""
    with pytest.raises(ConfigError) as caught:
        load_params(_write(tmp_path, yaml_text))
    for text in expected:
        assert text in str(caught.value)


def test_patch_size_that_does_not_divide_the_digits_is_refused_at_load(tmp_path: Path) -> None:
    """The 8x8 digits are known from params alone: patch 3 is refused by load_params, so by every stage."""
    with pytest.raises(ConfigError) as caught:
        load_params(_write(tmp_path, "model:\n  patch_size: 3\n"))
    assert str(caught.value) == ("model.patch_size=3: must divide the image size 8 of data.source 'digits' "
                                 "(accepted: 1, 2, 4, 8); or set model.img_size to a multiple of 3")


@pytest.mark.parametrize(("data", "patch_size", "side", "accepted"), [
    ({"source": "cifar10"}, 3, 32, "1, 2, 4, 8, 16, 32"),
    ({"source": "stl10"}, 5, 96, "1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 96"),
    ({"source": "imagefolder", "path": "data/raw/imgs", "image_size": 30}, 4, 30, "1, 2, 3, 5, 6, 10, 15, 30"),
])
def test_patch_size_is_checked_against_each_source_side(data: dict, patch_size: int, side: int,
                                                         accepted: str) -> None:
    with pytest.raises(ConfigError, match=rf"^model\.patch_size={patch_size}: must divide the image size {side} "
                                          rf"of data\.source '{data['source']}'.*\(accepted: {accepted}\)"):
        params_from_dict({"data": data, "model": {"patch_size": patch_size}})


@pytest.mark.parametrize("model", [
    {"img_size": 32, "patch_size": 8},  # an explicit input size replaces the digits' 8 (resized on the device)
    {"img_size": 32, "patch_size": 32},
    {"patch_size": 4},
    {"name": "resnet18", "patch_size": 3},  # a CNN ignores patch_size
    {"name": "vit_small_patch16_224", "patch_size": 3},  # a timm name: its ViT-ness is checked after fetch
    {"patch_size": 3, "compound_phi": 1.0},  # scaling rounds the resolution to whole patches (9 = 3 x 3)
    {"name": "efficientnet_b0", "patch_size": 3, "compound_phi": 1.0},  # scaled to a CNN
])
def test_patch_sizes_that_work_today_are_accepted(model: dict) -> None:
    assert params_from_dict({"model": model}).model.patch_size == model["patch_size"]


def test_imagefolder_patch_size_waits_for_the_data_without_image_size() -> None:
    """Without data.image_size the images keep their own size: only the fetched data knows it."""
    data = {"source": "imagefolder", "path": "data/raw/imgs"}
    assert params_from_dict({"data": data, "model": {"patch_size": 3}}).model.patch_size == 3
    assert params_from_dict({"data": {**data, "image_size": 30}, "model": {"patch_size": 5}}).data.image_size == 30


def test_mae_needs_widths_divisible_by_four() -> None:
    """MAE's 2D sin-cos position embeddings split the encoder's and decoder's widths in four."""
    with pytest.raises(ConfigError, match=r"^model\.embed_dim=66: must be a multiple of 4 with pretrain\.method='mae'"):
        params_from_dict({"model": {"embed_dim": 66, "num_heads": 3}})
    with pytest.raises(ConfigError, match=r"^pretrain\.decoder_embed_dim=66: must be a multiple of 4"):
        params_from_dict({"pretrain": {"decoder_embed_dim": 66, "decoder_num_heads": 3}})
    assert params_from_dict({"model": {"embed_dim": 66, "num_heads": 3}, "pretrain": {"method": "simclr"}})
    assert params_from_dict({"model": {"embed_dim": 66, "num_heads": 3, "compound_phi": 1.0}})  # rounded to 4s


# -- the bounds mechanism: each numeric key's range declared once, beside its field, checked by `Section`


def _sections() -> dict[str, type]:
    """Every section class of `Params` by its dotted place in params.yaml (the top level as '')."""
    found: dict[str, type] = {"": Params}

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            kinds = [kind for kind in typing.get_args(hints[field.name]) or (hints[field.name],)
                     if kind is not type(None)]
            if len(kinds) == 1 and dataclasses.is_dataclass(kinds[0]):
                found[prefix + field.name] = kinds[0]
                walk(kinds[0], f"{prefix}{field.name}.")

    walk(Params, "")
    return found


SECTIONS = _sections()


def _numeric_fields(cls: type) -> set[str]:
    hints = typing.get_type_hints(cls)
    numeric = set()
    for field in dataclasses.fields(cls):
        if typing.get_origin(hints[field.name]) is list:  # a list of numbers is checked by its section
            continue
        kinds = [kind for kind in typing.get_args(hints[field.name]) or (hints[field.name],) if kind is not type(None)]
        if kinds in ([int], [float]):
            numeric.add(field.name)
    return numeric


def _outside(bounds: Bounds, integer: bool) -> list[int | float]:
    """A value just outside each finite end of `bounds` (the end itself where it is open)."""
    values = []
    if math.isfinite(bounds.lower):
        values.append(bounds.lower if bounds.lower_open else bounds.lower - 1)
    if math.isfinite(bounds.upper):
        values.append(bounds.upper if bounds.upper_open else bounds.upper + 1)
    return [int(value) if integer else float(value) for value in values]


VIOLATIONS = [(place, name, value) for place, cls in SECTIONS.items()
              for name, (bounds, integer, _) in declared_bounds(cls).items() for value in _outside(bounds, integer)]


def test_every_section_names_its_place_in_the_file() -> None:
    """Errors spell a key from its section's `section`, so that must be where the section sits in params.yaml."""
    for place, cls in SECTIONS.items():
        if cls is GateParams:  # one class under each model's key (promote.classifier, ...): PromoteParams names it
            assert place.startswith(f"{PromoteParams.section}.")
            continue
        assert issubclass(cls, Section) and cls.section == place, (cls, place)


@pytest.mark.parametrize("place", sorted(SECTIONS))
def test_every_numeric_key_declares_its_bounds(place: str) -> None:
    """Every int and float key has `bounded` or `unbounded` (with its reason) beside it, in its class or a base."""
    declared = declared_bounds(SECTIONS[place])
    assert set(declared) == _numeric_fields(SECTIONS[place])
    for name, (bounds, _, _) in declared.items():
        assert bounds.interval or bounds.note, f"{place}.{name}: unbounded needs its reason"


def test_a_numeric_field_without_bounds_is_a_mistake_in_the_code() -> None:
    @dataclass(frozen=True)
    class Loose(Section):
        section: ClassVar[str] = "loose"
        steps: int = 1

    with pytest.raises(TypeError, match=r"Loose\.steps: a numeric field declares its range"):
        Loose()


@pytest.mark.parametrize(("place", "name", "value"), VIOLATIONS,
                         ids=[f"{place or 'top'}.{name}={value}" for place, name, value in VIOLATIONS])
def test_a_value_outside_its_bounds_gives_the_declared_message(place: str, name: str, value: float) -> None:
    """Loaded from YAML or built in Python, a value outside the declared bounds is refused with one message:
    the dotted key, the value, and the interval as declared (plus its note)."""
    cls = SECTIONS[place]
    bounds, integer, optional = declared_bounds(cls)[name]
    key = f"{place}.{name}" if place else name
    keys: dict[str, Any] = {name: value}
    if cls is GateParams:
        keys["metric"] = "test.accuracy"
    document: dict[str, Any] = keys
    for part in reversed(place.split(".") if place else []):
        document = {part: document}
    with pytest.raises(ConfigError) as loaded:
        params_from_dict(document)
    message = str(loaded.value)
    assert message == f"{key}={value!r}: {bounds.rule(integer=integer, optional=optional)}"
    assert message.startswith(f"{key}={value!r}: must be ")
    assert ("a positive integer" if integer and bounds.interval == ">= 1" else bounds.interval) in message
    assert (" or null" in message) == optional
    assert message.endswith(f" ({bounds.note})") == bool(bounds.note)
    with pytest.raises(ConfigError) as built:
        if cls is GateParams:
            PromoteParams(**{place.split(".")[-1]: GateParams(**keys)})
        else:
            cls(**keys)
    assert str(built.value) == message


@pytest.mark.parametrize(("interval", "integer", "optional", "note", "rule"), [
    (">= 1", True, False, "", "must be a positive integer"),
    (">= 1", True, True, "sized from d_model", "must be a positive integer or null (sized from d_model)"),
    (">= 0", True, False, "0: off", "must be an integer >= 0 (0: off)"),
    ("[0, 2**32)", True, False, "", "must be an integer in [0, 2**32)"),
    (">= 2", True, False, "", "must be >= 2"),
    ("(0, 1]", False, False, "", "must be in (0, 1]"),
    ("> 0", False, True, "no clipping", "must be > 0 or null (no clipping)"),
    ("< 1.0e-3", False, False, "", "must be < 1.0e-3"),
])
def test_a_rule_reads_as_its_interval(interval: str, integer: bool, optional: bool, note: str, rule: str) -> None:
    assert Bounds.parse(interval, note).rule(integer=integer, optional=optional) == rule


@pytest.mark.parametrize(("interval", "inside", "outside"), [
    (">= 1", [1, 2, 10**9], [0, -1]),
    ("> 0", [1.0e-12, 5.0], [0.0, -1.0]),
    ("<= 1", [1.0, -3.0], [1.5]),
    ("(0, 1]", [1.0e-9, 1.0], [0.0, 1.01]),
    ("[0, 1)", [0.0, 0.999], [1.0, -0.1]),
    ("[0, 2**32)", [0, 2**32 - 1], [2**32, -1]),
])
def test_bounds_admit_exactly_their_interval(interval: str, inside: list[float], outside: list[float]) -> None:
    bounds = Bounds.parse(interval)
    assert all(bounds.admits(value) for value in inside)
    assert not any(bounds.admits(value) for value in outside)


@pytest.mark.parametrize("interval", ["", "between 0 and 1", "0 < x", "(0, 1", ">=1"])
def test_a_malformed_interval_fails_where_it_is_declared(interval: str) -> None:
    with pytest.raises(ValueError, match="bounds"):
        Bounds.parse(interval)


@pytest.mark.parametrize("cls", [TrainParams, PretrainParams, FinetuneParams, RLParams, TextPretrainParams,
                                 TextSFTParams, TextRLParams])
def test_a_redeclared_default_keeps_the_base_bounds(cls: type[TrainParams]) -> None:
    """A training section that changes a base key's default (`epochs: int = 150`) keeps the base's bounds, and
    the error names the subclass's own section."""
    with pytest.raises(ConfigError, match=rf"^{cls.section}\.epochs=0: must be a positive integer$"):
        cls(epochs=0)
    with pytest.raises(ConfigError, match=rf"^{cls.section}\.drop_path_rate=1\.0: must be in \[0, 1\)$"):
        cls(drop_path_rate=1.0)
    with pytest.raises(ConfigError, match=rf"^{cls.section}\.log_every=0: must be a positive integer$"):
        cls(log_every=0)


def test_a_non_finite_number_built_in_python_is_refused_as_in_yaml(tmp_path: Path) -> None:
    """An unbounded key still takes finite numbers only, whether it comes from YAML or from Python."""
    with pytest.raises(ConfigError) as loaded:
        load_params(_write(tmp_path, "rl:\n  reward:\n    correct: .inf\n"))
    assert str(loaded.value) == "rl.reward.correct=inf: must be a finite number"
    with pytest.raises(ConfigError) as built:
        RLParams(reward=type(RLParams().reward)(correct=math.inf))
    assert str(built.value) == str(loaded.value)
