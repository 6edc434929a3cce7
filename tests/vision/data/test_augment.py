"""Batched SimCLR augmentations: determinism, identity and flip parameters, per-row independence."""

from __future__ import annotations

import pytest
import torch

from pipeline_lib.vision.data.augment import AugmentConfig, BatchAugment, adjust_hue, gaussian_blur

SHAPES = [(1, 8), (3, 32)]  # (channels, side): the digits default and a small RGB image


def _images(channels: int, side: int, batch: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, channels, side, side, generator=torch.Generator().manual_seed(seed))


def _identity_params(augment: BatchAugment, batch: int) -> dict[str, torch.Tensor]:
    """Sampled params with every random choice switched off: whole image, no flip, jitter, grayscale or blur."""
    params = augment.sample(batch, torch.Generator().manual_seed(0), "cpu")
    params["crop"] = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(batch, 1)
    for flag in ("flip", "jitter", "grayscale"):
        params[flag] = torch.zeros(batch, dtype=torch.bool)
    params["blur_sigma"] = torch.zeros(batch)
    return params


@pytest.mark.parametrize(("channels", "side"), SHAPES)
def test_output_shape_and_range(channels: int, side: int) -> None:
    augment = BatchAugment(AugmentConfig(), out_size=side)
    out = augment(_images(channels, side, batch=16), torch.Generator().manual_seed(1))
    assert out.shape == (16, channels, side, side)
    assert out.dtype == torch.float32 and out.min() >= 0 and out.max() <= 1


def test_resizes_to_out_size() -> None:
    out = BatchAugment(AugmentConfig(), out_size=16)(_images(3, 32), torch.Generator().manual_seed(1))
    assert out.shape == (6, 3, 16, 16)


@pytest.mark.parametrize(("channels", "side"), SHAPES)
def test_same_params_same_output_and_generators_differ(channels: int, side: int) -> None:
    augment, images = BatchAugment(AugmentConfig(), out_size=side), _images(channels, side)
    params = augment.sample(len(images), torch.Generator().manual_seed(2), "cpu")
    torch.testing.assert_close(augment.apply(images, params), augment.apply(images, params), rtol=0, atol=0)
    first = augment(images, torch.Generator().manual_seed(2))
    torch.testing.assert_close(first, augment(images, torch.Generator().manual_seed(2)), rtol=0, atol=0)
    assert not torch.allclose(first, augment(images, torch.Generator().manual_seed(3)))


@pytest.mark.parametrize(("channels", "side"), SHAPES)
def test_identity_params_return_the_input(channels: int, side: int) -> None:
    augment, images = BatchAugment(AugmentConfig(), out_size=side), _images(channels, side)
    torch.testing.assert_close(augment.apply(images, _identity_params(augment, len(images))), images,
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize(("channels", "side"), SHAPES)
def test_flip_mirrors_exactly(channels: int, side: int) -> None:
    augment, images = BatchAugment(AugmentConfig(), out_size=side), _images(channels, side)
    params = _identity_params(augment, len(images))
    params["flip"][::2] = True
    out = augment.apply(images, params)
    torch.testing.assert_close(out[::2], images[::2].flip(-1), rtol=0, atol=1e-5)
    torch.testing.assert_close(out[1::2], images[1::2], rtol=0, atol=1e-5)


def test_full_crop_of_a_quadrant_upsamples_it() -> None:
    augment = BatchAugment(AugmentConfig(), out_size=4)
    images = _images(1, 8, batch=2)
    params = _identity_params(augment, 2)
    params["crop"] = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5]])  # top-left, bottom-right
    out = augment.apply(images, params)
    # A 4x4 output of a 4x4 pixel box samples exactly the box's pixel centres.
    torch.testing.assert_close(out[0], images[0, :, :4, :4], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[1], images[1, :, 4:, 4:], rtol=0, atol=1e-5)


@pytest.mark.parametrize(("channels", "side"), SHAPES)
def test_rows_are_independent_so_processes_can_split_a_batch(channels: int, side: int) -> None:
    world = 3
    augment, images = BatchAugment(AugmentConfig(), out_size=side), _images(channels, side, batch=12)
    params = augment.sample(len(images), torch.Generator().manual_seed(4), "cpu")
    whole = augment.apply(images, params)
    for rank in range(world):
        mine = {name: value[rank::world] for name, value in params.items()}
        torch.testing.assert_close(augment.apply(images[rank::world], mine), whole[rank::world], rtol=0, atol=1e-6)


def test_grayscale_makes_channels_equal_and_single_channel_colour_ops_are_noops() -> None:
    cfg = AugmentConfig(jitter_p=0.0, blur_p=0.0, flip_p=0.0, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0),
                        grayscale_p=1.0)
    out = BatchAugment(cfg, out_size=32)(_images(3, 32), torch.Generator().manual_seed(0))
    torch.testing.assert_close(out[:, 0], out[:, 1])
    torch.testing.assert_close(out[:, 1], out[:, 2])
    images = _images(1, 8)
    torch.testing.assert_close(BatchAugment(cfg, out_size=8)(images, torch.Generator()), images, rtol=0, atol=1e-5)


def test_jitter_changes_colours_only_where_drawn() -> None:
    augment, images = BatchAugment(AugmentConfig(), out_size=32), _images(3, 32)
    params = _identity_params(augment, len(images))
    params["jitter"][:3] = True
    out = augment.apply(images, params)
    assert all(not torch.allclose(out[i], images[i], atol=1e-3) for i in range(3))
    torch.testing.assert_close(out[3:], images[3:], rtol=0, atol=1e-5)


def test_hue_rotation_keeps_luma_and_zero_shift_is_identity() -> None:
    images = 0.3 + 0.4 * _images(3, 8)  # mid-range colours: no clamping after a rotation
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    shifted = adjust_hue(images, torch.tensor([0.0, 0.05, -0.05, 0.1, -0.1, 0.02]))
    torch.testing.assert_close((shifted * luma).sum(1), (images * luma).sum(1))
    torch.testing.assert_close(shifted[0], images[0])
    assert not torch.allclose(shifted[1], images[1], atol=1e-3)


def test_gaussian_blur_keeps_constants_and_smooths_noise() -> None:
    constant = torch.full((2, 3, 8, 8), 0.25)
    torch.testing.assert_close(gaussian_blur(constant, torch.tensor([0.5, 2.0]), 3), constant)
    noise = _images(1, 16, batch=2)
    blurred = gaussian_blur(noise, torch.tensor([0.1, 2.0]), 5)
    assert blurred[1].std() < blurred[0].std() < noise[0].std() + 1e-6
    torch.testing.assert_close(blurred[0], noise[0], atol=1e-4, rtol=0)  # sigma 0.1: the kernel is ~a delta


def test_sampled_params_follow_the_config() -> None:
    cfg = AugmentConfig(crop_scale=(0.3, 0.6))
    params = BatchAugment(cfg, out_size=8).sample(2000, torch.Generator().manual_seed(0), "cpu")
    area = params["crop"][:, 2] * params["crop"][:, 3]
    assert area.min() >= 0.3 - 1e-6 and area.max() <= 0.6 + 1e-6
    assert (params["crop"][:, :2] >= 0).all() and (params["crop"][:, :2] + params["crop"][:, 2:] <= 1 + 1e-6).all()
    assert abs(params["flip"].float().mean() - 0.5) < 0.05 and abs(params["jitter"].float().mean() - 0.8) < 0.05
    assert abs((params["blur_sigma"] > 0).float().mean() - 0.5) < 0.05
    assert sorted(params["jitter_order"][0].tolist()) == [0, 1, 2, 3]


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="crop_scale"):
        AugmentConfig(crop_scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="flip_p"):
        AugmentConfig(flip_p=1.5)
    with pytest.raises(ValueError, match="hue"):
        AugmentConfig(hue=0.7)
