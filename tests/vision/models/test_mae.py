"""MAE: masking, patch layout, the loss against a naive reference, gradients, fixed positions, determinism."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from pipeline_lib.vision.models.mae import MaskedAutoencoder, build_vit_encoder, encoder_features, sincos_pos_embed

TINY = {"model_name": None, "img_size": 8, "patch_size": 2, "in_chans": 1, "embed_dim": 32, "depth": 2, "num_heads": 2}
NAMED = {"model_name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "in_chans": 3, "embed_dim": 192,
         "depth": 12, "num_heads": 3}
BUILDS = pytest.mark.parametrize("build", [TINY, NAMED], ids=["custom", "vit_tiny"])


def make_mae(build: dict | None = None, **options: object) -> MaskedAutoencoder:
    torch.manual_seed(0)
    encoder = build_vit_encoder(**(build or TINY))
    return MaskedAutoencoder(encoder, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, **options)


def images(mae: MaskedAutoencoder, batch: int = 3, seed: int = 1) -> Tensor:
    side = mae.grid[0] * mae.patch_size
    return torch.randn(batch, mae.in_chans, side, side, generator=torch.Generator().manual_seed(seed))


def naive_loss(imgs: Tensor, pred: Tensor, mask: Tensor, patch: int, norm_pix: bool) -> Tensor:
    """The masked-patch MSE written patch by patch, slicing the image directly."""
    total, count = 0.0, 0.0
    columns = imgs.shape[-1] // patch
    for b in range(imgs.shape[0]):
        for index in range(mask.shape[1]):
            if mask[b, index] == 0:
                continue
            row, col = divmod(index, columns)
            target = imgs[b, :, row * patch : (row + 1) * patch, col * patch : (col + 1) * patch]
            target = target.permute(1, 2, 0).reshape(-1)  # (p, p, C) order
            if norm_pix:
                target = (target - target.mean()) / math.sqrt(target.var().item() + 1e-6)
            total += ((pred[b, index] - target) ** 2).mean().item()
            count += 1
    return torch.tensor(total / count)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75, 0.9])
def test_random_masking_keeps_the_expected_patches(ratio: float) -> None:
    mae = make_mae(mask_ratio=ratio)
    batch, length, dim = 4, mae.num_patches, 5
    x = torch.randn(batch, length, dim)
    noise = torch.rand(batch, length, generator=torch.Generator().manual_seed(0))
    visible, mask, ids_restore = mae.random_masking(x, noise)
    keep = int(length * (1 - ratio))
    assert visible.shape == (batch, keep, dim)
    assert mask.shape == (batch, length) and set(mask.unique().tolist()) <= {0.0, 1.0}
    assert mask.sum(dim=1).tolist() == [length - keep] * batch
    ids_shuffle = noise.argsort(dim=1)
    shuffled = torch.gather(x, 1, ids_shuffle.unsqueeze(-1).expand(-1, -1, dim))
    assert torch.equal(torch.gather(shuffled, 1, ids_restore.unsqueeze(-1).expand(-1, -1, dim)), x)
    for b in range(batch):
        kept = (mask[b] == 0).nonzero().flatten()  # original order
        assert set(kept.tolist()) == set(ids_shuffle[b, :keep].tolist())  # the smallest noise is kept
        assert torch.equal(visible[b], x[b, ids_shuffle[b, :keep]])
        assert torch.equal(visible[b].sort(dim=0).values, x[b, kept].sort(dim=0).values)


@pytest.mark.parametrize("build", [TINY, {**TINY, "in_chans": 3}], ids=["1ch", "3ch"])
def test_patchify_layout_and_round_trip(build: dict) -> None:
    mae = make_mae(build)
    channels, side, p = mae.in_chans, 8, mae.patch_size
    c, r, q = torch.meshgrid(torch.arange(channels), torch.arange(side), torch.arange(side), indexing="ij")
    imgs = torch.stack([1000 * c + 10 * r + q, 5000 + 1000 * c + 10 * r + q]).float()  # distinct per (b, c, row, col)
    patches = mae.patchify(imgs)
    assert patches.shape == (2, mae.num_patches, p * p * channels)
    for b in range(2):
        for index in range(mae.num_patches):
            row, col = divmod(index, side // p)
            block = imgs[b, :, row * p : (row + 1) * p, col * p : (col + 1) * p]  # (C, p, p)
            assert torch.equal(patches[b, index], block.permute(1, 2, 0).reshape(-1))
    assert torch.equal(mae.unpatchify(patches), imgs)
    with pytest.raises(ValueError, match="expected"):
        mae.patchify(imgs.transpose(0, 1) if channels > 1 else imgs[..., :6])


@pytest.mark.parametrize("norm_pix", [False, True], ids=["pixels", "norm_pix"])
def test_loss_counts_only_masked_patches_and_matches_reference(norm_pix: bool) -> None:
    mae = make_mae({**TINY, "in_chans": 3}, norm_pix_loss=norm_pix)
    imgs = images(mae)
    _, mask, _ = mae.random_masking(torch.zeros(3, mae.num_patches, 1), torch.rand(3, mae.num_patches))
    pred = torch.randn(3, mae.num_patches, mae.patch_size**2 * 3)
    loss = mae.forward_loss(imgs, pred, mask)
    torch.testing.assert_close(loss, naive_loss(imgs, pred, mask, mae.patch_size, norm_pix))
    visible_changed = torch.where(mask.bool().unsqueeze(-1), pred, pred + 100 * torch.randn_like(pred))
    assert torch.equal(mae.forward_loss(imgs, visible_changed, mask), loss)
    masked_changed = pred.clone()
    b, index = mask.nonzero()[0].tolist()
    masked_changed[b, index] += 1.0
    assert mae.forward_loss(imgs, masked_changed, mask) != loss


def test_fixed_pos_embed_matches_the_official_formula() -> None:
    dim, grid = 16, (4, 4)
    ours = sincos_pos_embed(grid, dim, prefix_tokens=1)[0]
    assert ours.shape == (1 + 16, dim) and torch.equal(ours[0], torch.zeros(dim))
    # official get_2d_sincos_pos_embed: per axis [sin(pos * f), cos(pos * f)], f_k = 1 / 10000^(k / (dim/4))
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(4.0, dtype=torch.float64), torch.arange(4.0, dtype=torch.float64),
                                indexing="ij")
    angles = [rows.reshape(-1, 1) * freqs, cols.reshape(-1, 1) * freqs]
    official = torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1).float()  # (16, dim)
    ours_columns = sorted(map(tuple, ours[1:].T.round(decimals=5).tolist()))
    official_columns = sorted(map(tuple, official.T.round(decimals=5).tolist()))
    assert ours_columns == official_columns  # the same features, up to the channel order
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed(grid, 18, prefix_tokens=1)


@BUILDS
def test_every_trainable_parameter_gets_a_gradient(build: dict) -> None:
    mae = make_mae(build)
    loss, pred, mask = mae(images(mae), generator=torch.Generator().manual_seed(0))
    assert pred.shape == (3, mae.num_patches, mae.patch_size**2 * mae.in_chans) and mask.shape == (3, mae.num_patches)
    assert torch.isfinite(loss)
    loss.backward()
    missing = [name for name, p in mae.named_parameters() if p.requires_grad and p.grad is None]
    zero = [name for name, p in mae.named_parameters() if p.requires_grad and p.grad is not None and not p.grad.any()]
    assert not missing and not zero, (missing, zero)
    assert mae.encoder.cls_token.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in mae.parameters() if p.grad is not None)


@BUILDS
def test_two_adamw_steps_change_weights_but_not_positions(build: dict) -> None:
    mae = make_mae(build)
    frozen = {"encoder.pos_embed", "decoder_pos_embed"}
    assert {name for name, p in mae.named_parameters() if not p.requires_grad} == frozen
    before = {name: p.detach().clone() for name, p in mae.named_parameters()}
    optimizer = torch.optim.AdamW(mae.parameters(), lr=1e-3, weight_decay=0.05)
    for step in range(2):
        optimizer.zero_grad()
        mae(images(mae, seed=step))[0].backward()
        optimizer.step()
    after = dict(mae.named_parameters())
    unchanged = [name for name in before if name not in frozen and torch.equal(before[name], after[name])]
    assert not unchanged
    for name in frozen:
        assert torch.equal(before[name], after[name]) and after[name].grad is None


@BUILDS
def test_build_gives_a_classifier_free_vit(build: dict) -> None:
    encoder = build_vit_encoder(**build)
    assert encoder.num_classes == 0 and encoder.embed_dim == build["embed_dim"]
    assert encoder.patch_embed.num_patches == (build["img_size"] // build["patch_size"]) ** 2
    assert encoder.patch_embed.proj.in_channels == build["in_chans"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"img_size": 9}, "not a multiple of the patch size"),
        ({"model_name": "resnet18"}, "not a timm VisionTransformer"),
        ({"model_name": "no_such_model"}, "unknown timm model"),
    ],
)
def test_build_rejects_bad_arguments(override: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_vit_encoder(**{**TINY, **override})


@BUILDS
def test_encoder_features_are_pooled_and_deterministic(build: dict) -> None:
    mae = make_mae(build)
    mae.eval()
    imgs = images(mae)
    with torch.no_grad():
        first, second = encoder_features(mae.encoder, imgs), encoder_features(mae.encoder, imgs)
    assert first.shape == (3, build["embed_dim"]) and torch.equal(first, second) and torch.isfinite(first).all()
    assert not mae.encoder.pos_embed.requires_grad  # the timm path runs on the fixed sin-cos positions


def test_same_noise_or_seed_gives_the_same_output() -> None:
    mae = make_mae()
    imgs = images(mae)
    noise = torch.rand(3, mae.num_patches)
    first, second = mae(imgs, noise=noise), mae(imgs, noise=noise)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    seeded = [mae(imgs, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*seeded, strict=True))
    other = mae(imgs, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(seeded[0][2], other[2])


@pytest.mark.parametrize(
    "vit_options",
    [{"class_token": False, "global_pool": "avg"}, {"reg_tokens": 2}, {"no_embed_class": True, "reg_tokens": 1}],
    ids=["no-cls", "registers", "no-embed-class"],
)
def test_prefix_token_variants(vit_options: dict) -> None:
    from timm.models.vision_transformer import VisionTransformer

    encoder = VisionTransformer(img_size=8, patch_size=2, in_chans=1, embed_dim=32, depth=1, num_heads=2,
                                num_classes=0, **vit_options)
    mae = MaskedAutoencoder(encoder, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    prefix_slots = 0 if encoder.no_embed_class else encoder.num_prefix_tokens
    assert encoder.pos_embed.shape == (1, prefix_slots + 16, 32)
    assert not encoder.pos_embed[:, :prefix_slots].any()
    latent, _, _ = mae.forward_encoder(images(mae), torch.rand(3, 16))
    assert latent.shape == (3, encoder.num_prefix_tokens + 4, 32)
    loss, pred, _ = mae(images(mae))
    assert pred.shape == (3, 16, 4) and torch.isfinite(loss)
    mae.eval()
    with torch.no_grad():
        assert encoder_features(encoder, images(mae)).shape == (3, 32)


def test_bf16_autocast_gives_a_float32_finite_loss() -> None:
    mae = make_mae(norm_pix_loss=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, pred, mask = mae(images(mae), generator=torch.Generator().manual_seed(0))
    assert pred.dtype == torch.bfloat16 and mask.dtype == torch.float32 and loss.dtype == torch.float32
    assert torch.isfinite(loss)
    loss.backward()
    assert mae.encoder.cls_token.grad is not None


def test_constructor_rejects_bad_options() -> None:
    with pytest.raises(ValueError, match="mask_ratio"):
        make_mae(mask_ratio=1.0)
    with pytest.raises(ValueError, match="VisionTransformer"):
        MaskedAutoencoder(torch.nn.Linear(2, 2))  # type: ignore[arg-type]
