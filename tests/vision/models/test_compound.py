"""Compound scaling: φ = 0 is the base model, sizes grow with φ, EfficientNet variants, save/load, config errors."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from pipeline_lib.core.errors import ConfigError
from pipeline_lib.core.tracking import Tracker
from pipeline_lib.params import params_from_dict
from pipeline_lib.vision.config import ModelParams
from pipeline_lib.vision.models.compound import (
    EFFICIENTNET_MULTIPLIERS,
    compound_scale,
    count_flops,
    count_parameters,
    log_model_size,
)
from pipeline_lib.vision.models.factory import build_encoder, load_network, resolve_params, save_network
from pipeline_lib.vision.models.mae import MaskedAutoencoder
from pipeline_lib.vision.models.preprocess import Preprocess
from pipeline_lib.vision.models.scaling import main

pytestmark = pytest.mark.usefixtures("one_thread")

REPO_PARAMS = Path(__file__).resolve().parents[3] / "params.yaml"
VIT = ModelParams()  # the committed defaults: vit, depth 4, width 64, 4 heads, patch 2
DIGITS = 8  # side of the prepared digits, the base resolution when model.img_size is null
PHIS = (0.0, 0.5, 1.0, 2.0, 3.0)


def increasing(values: tuple[int, ...]) -> bool:
    return all(a < b for a, b in itertools.pairwise(values))


def sizes(model: ModelParams, phi: float, *, data_img_size: int) -> tuple[int, int]:
    """(parameters, FLOPs per image) of the encoder `model` describes at φ, one input channel."""
    resolved, scaling = compound_scale(dataclasses.replace(model, compound_phi=phi), data_img_size=data_img_size)
    torch.manual_seed(0)
    encoder = build_encoder(resolved, in_chans=1, img_size=scaling.img_size)
    return count_parameters(encoder), count_flops(encoder, in_chans=1, img_size=scaling.img_size)


@pytest.mark.parametrize("model", [VIT, ModelParams(name="efficientnet_b0")], ids=["vit", "efficientnet_b0"])
def test_phi_zero_is_the_base_model(model: ModelParams) -> None:
    resolved, scaling = compound_scale(model, data_img_size=DIGITS)
    assert resolved == model and scaling.name == model.name and scaling.img_size == DIGITS
    assert scaling.target == scaling.achieved == (1.0, 1.0, 1.0)
    without_knob = {k: v for k, v in dataclasses.asdict(model).items() if not k.startswith("compound_")}
    torch.manual_seed(0)
    base = build_encoder(ModelParams(**without_knob), in_chans=1, img_size=DIGITS)
    torch.manual_seed(0)
    scaled = build_encoder(resolved, in_chans=1, img_size=scaling.img_size)
    assert count_parameters(scaled) == count_parameters(base)
    for (name, a), (_, b) in zip(base.state_dict().items(), scaled.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_vit_rounding_at_phi_one() -> None:
    """depth ceil(4 x 1.2) = 5; width 64 x 1.1 = 70.4 -> 72 (multiple of 2 x 4 heads); side 8 x 1.15 = 9.2 -> 10."""
    resolved, scaling = compound_scale(dataclasses.replace(VIT, compound_phi=1.0), data_img_size=DIGITS)
    assert (resolved.depth, resolved.embed_dim, resolved.img_size) == (5, 72, 10)
    assert resolved.compound_phi == 0.0 and resolved.num_heads == VIT.num_heads
    assert scaling.target == pytest.approx((1.2, 1.1, 1.15))
    assert scaling.achieved == pytest.approx((5 / 4, 72 / 64, 10 / 8))


@pytest.mark.parametrize(("embed_dim", "num_heads", "patch_size"), [(64, 4, 2), (48, 3, 4), (30, 3, 1)])
def test_vit_scaling_never_shrinks_and_keeps_heads_even(embed_dim: int, num_heads: int, patch_size: int) -> None:
    model = ModelParams(embed_dim=embed_dim, num_heads=num_heads, patch_size=patch_size, img_size=8 * patch_size)
    previous = (model.depth, model.embed_dim, model.img_size)
    for step in range(1, 41):
        resolved, _ = compound_scale(dataclasses.replace(model, compound_phi=step / 10), data_img_size=DIGITS)
        head_width, rest = divmod(resolved.embed_dim, num_heads)
        assert rest == 0 and head_width % 2 == 0 and resolved.embed_dim % 4 == 0
        assert resolved.img_size % patch_size == 0
        current = (resolved.depth, resolved.embed_dim, resolved.img_size)
        assert all(now >= before for now, before in zip(current, previous, strict=True)), (step, current)
        previous = current


def test_vit_parameters_and_flops_grow_with_phi() -> None:
    measured = [sizes(VIT, phi, data_img_size=DIGITS) for phi in PHIS]
    params, flops = zip(*measured, strict=True)
    assert increasing(params), params
    assert increasing(flops), flops


@pytest.mark.parametrize(("base", "phi", "variant"), [
    ("efficientnet_b0", 0.5, "efficientnet_b1"),
    ("efficientnet_b0", 1.0, "efficientnet_b2"),
    ("efficientnet_b0", 2.0, "efficientnet_b3"),
    ("efficientnet_b0", 3.0, "efficientnet_b4"),
    ("efficientnet_b0", 7.0, "efficientnet_b7"),
    ("efficientnet_b3", 1.0, "efficientnet_b4"),
])
def test_efficientnet_maps_to_the_nearest_variant(base: str, phi: float, variant: str) -> None:
    resolved, scaling = compound_scale(ModelParams(name=base, compound_phi=phi), data_img_size=32)
    assert resolved.name == scaling.name == variant and resolved.compound_phi == 0.0
    assert resolved.img_size == round(32 * 1.15**phi) and resolved.patch_size is None
    for achieved, target in zip(scaling.achieved[:2], scaling.target[:2], strict=True):
        assert abs(math.log(achieved / target)) <= math.log(1.2)


def test_phi_beyond_b7_names_the_key_and_the_nearest_variant() -> None:
    with pytest.raises(ConfigError, match=r"model.compound_phi=8.0: .*efficientnet_b7"):
        compound_scale(ModelParams(name="efficientnet_b0", compound_phi=8.0), data_img_size=32)


def test_efficientnet_parameters_and_flops_grow_with_phi() -> None:
    """b0, b1, b2, b3 (φ = 0, 0.5, 1, 2 from b0) at 32 x 32 and up, one input channel."""
    model = ModelParams(name="efficientnet_b0", img_size=32)
    measured = [sizes(model, phi, data_img_size=32) for phi in (0.0, 0.5, 1.0, 2.0)]
    params, flops = zip(*measured, strict=True)
    assert increasing(params), params
    assert increasing(flops), flops


def test_variant_table_matches_timm_and_config() -> None:
    """The multipliers are timm's (b1 is b0 with 1.1x the repeats: more blocks, same stem), and every variant
    is a name `ModelParams` accepts for scaling."""
    assert set(ModelParams.compound_models) == {"vit", *EFFICIENTNET_MULTIPLIERS}
    b0 = build_encoder(ModelParams(name="efficientnet_b0"), in_chans=1, img_size=32)
    b1 = build_encoder(ModelParams(name="efficientnet_b1"), in_chans=1, img_size=32)
    assert sum(map(len, b1.blocks)) == sum(math.ceil(len(s) * 1.1) for s in b0.blocks) > sum(map(len, b0.blocks))
    assert b1.num_features == b0.num_features


def test_resolved_spec_saves_and_rebuilds_the_same_network(tmp_path: Path) -> None:
    resolved, scaling = compound_scale(dataclasses.replace(VIT, compound_phi=1.0), data_img_size=DIGITS)
    torch.manual_seed(0)
    network = build_encoder(resolved, in_chans=1, img_size=scaling.img_size).eval()
    config = save_network(network, Preprocess([0.5], [0.25], scaling.img_size), resolved, tmp_path, in_chans=1)
    assert config["model"]["compound_phi"] == 0.0 and config["model"]["depth"] == 5
    loaded, preprocess, _ = load_network(tmp_path)
    assert preprocess.img_size == 10 and count_parameters(loaded) == count_parameters(network)
    images = torch.rand(2, 1, 10, 10, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), network(images))


def test_an_unresolved_spec_is_neither_built_nor_saved(tmp_path: Path) -> None:
    unresolved = dataclasses.replace(VIT, compound_phi=1.0)
    with pytest.raises(ValueError, match=r"model.compound_phi=1.0: build and save the resolved spec"):
        build_encoder(unresolved, in_chans=1, img_size=DIGITS)
    network = build_encoder(VIT, in_chans=1, img_size=DIGITS)
    with pytest.raises(ValueError, match=r"model.compound_phi=1.0"):
        save_network(network, Preprocess([0.5], [0.25], DIGITS), unresolved, tmp_path, in_chans=1)


def test_resolved_params_reach_the_mae_decoder() -> None:
    """The stage resolves once: the MAE built from the resolved params has the scaled patch grid."""
    params = params_from_dict({"model": {"compound_phi": 1.0}})
    resolved, scaling = resolve_params(params, data_img_size=DIGITS)
    assert resolved.pretrain == params.pretrain and resolved.model.compound_phi == 0.0
    assert resolve_params(resolved, data_img_size=DIGITS)[0] == resolved  # resolving twice changes nothing
    encoder = build_encoder(resolved.model, in_chans=1, img_size=scaling.img_size)
    mae = MaskedAutoencoder(encoder, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    assert mae.grid == (5, 5) and len(mae.encoder.blocks) == 5
    loss, pred, _ = mae(torch.rand(2, 1, 10, 10))
    assert pred.shape == (2, 25, 4) and torch.isfinite(loss)


def test_flops_count_a_multiply_add_as_two_and_leave_the_network_as_it_was() -> None:
    linear = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    assert count_flops(linear, in_chans=3, img_size=4) == 2 * (3 * 4 * 4) * 5
    network = build_encoder(ModelParams(name="efficientnet_b0"), in_chans=1, img_size=32)
    network.blocks[0].eval()  # a mixed state must come back as it was
    stats = network.bn1.running_mean.clone()
    count_flops(network, in_chans=1, img_size=32)
    assert torch.equal(network.bn1.running_mean, stats) and network.training and not network.blocks[0].training


class RecordingTracker(Tracker):
    def __init__(self) -> None:
        self.params: dict[str, Any] = {}
        self.metrics: dict[str, float] = {}

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.params.update(params)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.metrics.update(metrics)


@pytest.mark.parametrize("phi", [0.0, 1.0])
def test_model_size_is_printed_and_logged(phi: float, capsys: pytest.CaptureFixture[str]) -> None:
    resolved, scaling = compound_scale(dataclasses.replace(VIT, compound_phi=phi), data_img_size=DIGITS)
    encoder = build_encoder(resolved, in_chans=1, img_size=scaling.img_size)
    tracker = RecordingTracker()
    sizes_logged = log_model_size("pretrain", scaling, encoder, in_chans=1, tracker=tracker)
    line = capsys.readouterr().out
    assert line.startswith(f"pretrain: compound scaling {'off (φ=0)' if phi == 0 else 'φ=1'}") and "FLOPs" in line
    assert tracker.params["model.scaled.depth"] == resolved.depth
    assert tracker.params["model.scaled.embed_dim"] == resolved.embed_dim
    assert tracker.params["model.scaled.img_size"] == scaling.img_size
    assert tracker.metrics == {k: float(v) for k, v in sizes_logged.items()}
    assert sizes_logged["model_params"] == count_parameters(encoder)


@pytest.mark.parametrize(("model", "match"), [
    ({"compound_phi": -0.5}, r"model.compound_phi=-0.5: must be >= 0"),
    ({"compound_alpha": 0.9}, r"model.compound_alpha=0.9: must be >= 1"),
    ({"compound_gamma": 0.5}, r"model.compound_gamma=0.5: must be >= 1"),
    ({"name": "resnet18", "compound_phi": 1.0},
     r"model.compound_phi=1.0: compound scaling supports model.name vit, efficientnet_b0, .*'resnet18'"),
])
def test_bad_compound_keys_name_the_key(model: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        params_from_dict({"model": model})


def test_unsupported_model_is_fine_without_scaling() -> None:
    assert params_from_dict({"model": {"name": "resnet18"}}).model.compound_phi == 0.0


def test_command_line_prints_one_row_per_phi(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--params", str(REPO_PARAMS), "--phi", "0", "1"])
    rows = capsys.readouterr().out.splitlines()
    assert len(rows) == 4 and rows[1].split()[:5] == ["phi", "model", "depth", "width", "res"]
    assert rows[2].split()[:5] == ["0", "vit", "4", "64", "8"]
    assert rows[3].split()[:5] == ["1", "vit", "5", "72", "10"]
