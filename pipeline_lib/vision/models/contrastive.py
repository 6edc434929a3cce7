"""Two-view contrastive models: SimCLR (Chen et al. 2020) and MoCo v3 (Chen, Xie, He 2021) around any backbone.

The models return embeddings; the losses live in `pipeline_lib.vision.losses`. Each exposes `.backbone`,
the encoder that gets exported after pretraining (heads are discarded, as in both papers).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from pipeline_lib.vision.models.backbone import feature_dim


def projection_mlp(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2,
                   last_bn: bool = True) -> nn.Sequential:
    """Linear-BN-ReLU blocks, then a final Linear (followed by a BN without affine when `last_bn`, as MoCo v3).

    Linear layers followed by a BN have no bias (the BN's shift replaces it), so every parameter gets a gradient.

    Args:
        in_dim: input features.
        hidden_dim: width of the hidden layers.
        out_dim: output features.
        num_layers: Linear layers, >= 1.
        last_bn: end with `BatchNorm1d(out_dim, affine=False)`.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers={num_layers}: a projection needs at least one Linear layer")
    layers: list[nn.Module] = []
    for index in range(num_layers):
        last = index == num_layers - 1
        dim_in = in_dim if index == 0 else hidden_dim
        dim_out = out_dim if last else hidden_dim
        followed_by_bn = not last or last_bn
        layers.append(nn.Linear(dim_in, dim_out, bias=not followed_by_bn))
        if not last:
            layers += [nn.BatchNorm1d(dim_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(dim_out, affine=False))
    return nn.Sequential(*layers)


class SimCLR(nn.Module):
    """Backbone + 2-layer projection head g(h) = W2 ReLU(BN(W1 h)) (SimCLR, section 2.1).

    Both views go through the network as one batch, so BatchNorm sees 2B samples as in the paper.

    Args:
        backbone: feature extractor giving (B, num_features).
        projection_dim: size of the projections z the loss sees.
        hidden_dim: width of the projection head.

    Examples:
        >>> from pipeline_lib.vision.models.backbone import create_backbone
        >>> model = SimCLR(create_backbone("resnet18", in_chans=1), projection_dim=32, hidden_dim=64)
        >>> z1, z2 = model(torch.rand(4, 1, 8, 8), torch.rand(4, 1, 8, 8))
        >>> z1.shape
        torch.Size([4, 32])
    """

    def __init__(self, backbone: nn.Module, *, projection_dim: int = 128, hidden_dim: int = 512) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projection_mlp(feature_dim(backbone), hidden_dim, projection_dim, num_layers=2,
                                        last_bn=False)

    def forward(self, view1: Tensor, view2: Tensor) -> tuple[Tensor, Tensor]:
        """Two (B, C, H, W) views of the same images -> their projections z1, z2, (B, projection_dim) each."""
        z = self.projector(self.backbone(torch.cat([view1, view2])))  # (2B, projection_dim)
        z1, z2 = z.chunk(2)
        return z1, z2


class MoCoV3(nn.Module):
    """Online backbone + 3-layer projector + 2-layer predictor; momentum copies of backbone and projector.

    The momentum branch is an exponential moving average of the online one (`update_momentum`, called by the
    trainer after each optimizer step) and never receives gradients. Each view is a separate forward, as in
    the paper's code, so BatchNorm statistics are per view.

    Args:
        backbone: feature extractor giving (B, num_features).
        projection_dim: size of the projections and predictions.
        hidden_dim: width of the projector's and predictor's hidden layers.

    Examples:
        >>> from pipeline_lib.vision.models.backbone import create_backbone
        >>> model = MoCoV3(create_backbone("resnet18", in_chans=1), projection_dim=32, hidden_dim=64)
        >>> q1, q2, k1, k2 = model(torch.rand(4, 1, 8, 8), torch.rand(4, 1, 8, 8))
        >>> model.update_momentum(0.99)
        >>> q1.shape, k1.requires_grad
        (torch.Size([4, 32]), False)
    """

    def __init__(self, backbone: nn.Module, *, projection_dim: int = 256, hidden_dim: int = 1024) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projection_mlp(feature_dim(backbone), hidden_dim, projection_dim, num_layers=3)
        self.predictor = projection_mlp(projection_dim, hidden_dim, projection_dim, num_layers=2, last_bn=False)
        self.momentum_backbone = copy.deepcopy(backbone)
        self.momentum_projector = copy.deepcopy(self.projector)
        for parameter in self.momentum_parameters():
            parameter.requires_grad_(False)

    def online_parameters(self) -> list[nn.Parameter]:
        """Backbone then projector parameters, in the order `momentum_parameters` mirrors."""
        return [*self.backbone.parameters(), *self.projector.parameters()]

    def momentum_parameters(self) -> list[nn.Parameter]:
        return [*self.momentum_backbone.parameters(), *self.momentum_projector.parameters()]

    @torch.no_grad()
    def update_momentum(self, momentum: float) -> None:
        """EMA step of the momentum branch: k <- momentum * k + (1 - momentum) * q, parameter by parameter."""
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        online, target = self.online_parameters(), self.momentum_parameters()
        torch._foreach_lerp_(target, [q.detach() for q in online], 1.0 - momentum)

    def forward(self, view1: Tensor, view2: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Two (B, C, H, W) views -> predictions q1, q2 and momentum keys k1, k2 (no grad), (B, D) each."""
        q1 = self.predictor(self.projector(self.backbone(view1)))
        q2 = self.predictor(self.projector(self.backbone(view2)))
        with torch.no_grad():
            k1 = self.momentum_projector(self.momentum_backbone(view1))
            k2 = self.momentum_projector(self.momentum_backbone(view2))
        return q1, q2, k1, k2
