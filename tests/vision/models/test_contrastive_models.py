"""timm backbones by name, and the SimCLR / MoCo v3 models: shapes, gradients, training steps, momentum."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from pipeline_lib.vision.losses import mocov3_loss, nt_xent
from pipeline_lib.vision.models.backbone import create_backbone, feature_dim
from pipeline_lib.vision.models.contrastive import MoCoV3, SimCLR, projection_mlp


def tiny_vit() -> nn.Module:
    return VisionTransformer(img_size=8, patch_size=2, in_chans=1, embed_dim=32, depth=1, num_heads=2,
                             num_classes=0)


def tiny_resnet() -> nn.Module:
    return create_backbone("resnet18", in_chans=1)


BACKBONES: dict[str, Callable[[], nn.Module]] = {"resnet18": tiny_resnet, "tiny_vit": tiny_vit}


def _views(batch: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 1, 8, 8, generator=generator), torch.rand(batch, 1, 8, 8, generator=generator)


# --- backbones -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "overrides"),
    [("resnet18", {}), ("efficientnet_b0", {}), ("vit_small_patch16_224", {"patch_size": 8})],
)
def test_create_backbone_gives_pooled_features(name: str, overrides: dict[str, int]) -> None:
    backbone = create_backbone(name, in_chans=3, img_size=32, **overrides)
    with torch.no_grad():
        features = backbone(torch.rand(2, 3, 32, 32))
    assert features.shape == (2, feature_dim(backbone))


def test_resnet_runs_on_tiny_grayscale_images() -> None:
    backbone = tiny_resnet()
    assert backbone(torch.rand(2, 1, 8, 8)).shape == (2, 512)


def test_unknown_name_suggests_close_matches() -> None:
    with pytest.raises(ValueError, match=r"unknown timm model 'resnet19'.*resnet18"):
        create_backbone("resnet19", in_chans=1)


def test_override_the_model_does_not_take_is_named() -> None:
    with pytest.raises(ValueError, match="patch_size"):
        create_backbone("resnet18", in_chans=1, patch_size=8)


# --- heads -----------------------------------------------------------------------------------------------------


def test_projection_mlp_layout() -> None:
    mlp = projection_mlp(16, 32, 8, num_layers=3, last_bn=True)
    linears = [m for m in mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 32), (32, 32), (32, 8)]
    assert all(m.bias is None for m in linears)  # each is followed by a BatchNorm
    assert isinstance(mlp[-1], nn.BatchNorm1d) and not mlp[-1].affine
    open_ended = projection_mlp(16, 32, 8, last_bn=False)
    assert isinstance(open_ended[-1], nn.Linear) and open_ended[-1].bias is not None
    with pytest.raises(ValueError, match="num_layers"):
        projection_mlp(16, 32, 8, num_layers=0)


# --- SimCLR / MoCo v3 ------------------------------------------------------------------------------------------


def _simclr_loss(model: SimCLR, views: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nt_xent(*model(*views), temperature=0.2)


def _mocov3_loss(model: MoCoV3, views: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return mocov3_loss(*model(*views), temperature=0.2)


def _build(method: str, backbone: str) -> tuple[nn.Module, Callable[..., torch.Tensor]]:
    if method == "simclr":
        return SimCLR(BACKBONES[backbone](), projection_dim=16, hidden_dim=32), _simclr_loss
    return MoCoV3(BACKBONES[backbone](), projection_dim=16, hidden_dim=32), _mocov3_loss


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
@pytest.mark.parametrize("method", ["simclr", "mocov3"])
def test_every_trainable_parameter_gets_a_gradient(method: str, backbone: str) -> None:
    torch.manual_seed(0)
    model, loss_fn = _build(method, backbone)
    loss_fn(model, _views()).backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert sum(p.grad.abs().sum() for p in model.backbone.parameters()) > 0


@pytest.mark.parametrize("method", ["simclr", "mocov3"])
def test_two_sgd_steps_change_the_trainable_parameters(method: str) -> None:
    torch.manual_seed(0)
    model, loss_fn = _build(method, "tiny_vit")
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    frozen = {name: p for name, p in model.named_parameters() if not p.requires_grad}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD(trainable.values(), lr=0.1)
    for step in range(2):
        optimizer.zero_grad()
        loss = loss_fn(model, _views(seed=step))
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
    assert any(not torch.equal(before[name], p) for name, p in model.backbone.named_parameters(prefix="backbone"))
    assert any(not torch.equal(before[name], p) for name, p in trainable.items() if "proj" in name)
    for name, p in frozen.items():
        torch.testing.assert_close(p, before[name], rtol=0, atol=0, msg=f"optimizer moved frozen {name}")


def test_simclr_projections() -> None:
    model = SimCLR(tiny_vit(), projection_dim=16, hidden_dim=32)
    z1, z2 = model(*_views())
    assert z1.shape == z2.shape == (4, 16)
    assert model.backbone is not None and feature_dim(model.backbone) == 32


def test_mocov3_keys_have_no_gradient_and_momentum_branch_is_frozen() -> None:
    model = MoCoV3(tiny_vit(), projection_dim=16, hidden_dim=32)
    q1, q2, k1, k2 = model(*_views())
    assert q1.shape == k1.shape == (4, 16)
    assert q1.requires_grad and q2.requires_grad and not k1.requires_grad and not k2.requires_grad
    assert all(not p.requires_grad for p in model.momentum_parameters())
    assert len(model.momentum_parameters()) == len(model.online_parameters())
    # The momentum branch starts as a copy of the online one.
    for online, target in zip(model.online_parameters(), model.momentum_parameters(), strict=True):
        torch.testing.assert_close(online, target)


def test_update_momentum_is_an_ema_of_the_online_branch() -> None:
    torch.manual_seed(0)
    model = MoCoV3(tiny_vit(), projection_dim=16, hidden_dim=32)
    with torch.no_grad():
        for p in model.online_parameters():
            p.add_(torch.randn_like(p))
    online = [p.detach().clone() for p in model.online_parameters()]
    target = [p.detach().clone() for p in model.momentum_parameters()]
    model.update_momentum(0.9)
    for q, k, updated in zip(online, target, model.momentum_parameters(), strict=True):
        torch.testing.assert_close(updated, 0.9 * k + 0.1 * q)
    for q, p in zip(online, model.online_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)  # the online branch is left alone
    model.update_momentum(1.0)  # momentum 1 keeps the targets
    with pytest.raises(ValueError, match="momentum"):
        model.update_momentum(1.5)
