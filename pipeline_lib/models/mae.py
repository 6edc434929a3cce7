"""Masked autoencoder (He et al. 2021, "Masked Autoencoders Are Scalable Vision Learners") on a timm ViT.

The model is a row of named steps: `patchify`, `random_masking`, `forward_encoder`, `forward_decoder`,
`forward_loss`. The encoder is a real timm `VisionTransformer` (its patch embedding, class token, blocks and
norm), so the exported encoder loads into timm as it is; its position embedding is replaced by fixed 2D
sin-cos values, as in the official recipe.
"""

from __future__ import annotations

import timm
import torch
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn


def build_vit_encoder(
    *,
    model_name: str | None,
    img_size: int,
    patch_size: int,
    in_chans: int,
    embed_dim: int,
    depth: int,
    num_heads: int,
    drop_path_rate: float = 0.0,
) -> VisionTransformer:
    """A timm ViT without a classifier: `model_name` from timm (with size overrides) or a custom one."""
    if img_size % patch_size:
        raise ValueError(f"image size {img_size} is not a multiple of the patch size {patch_size}")
    common = {"img_size": img_size, "patch_size": patch_size, "in_chans": in_chans, "num_classes": 0,
              "drop_path_rate": drop_path_rate}
    if model_name is None:
        encoder = VisionTransformer(embed_dim=embed_dim, depth=depth, num_heads=num_heads, **common)
    else:
        encoder = timm.create_model(model_name, pretrained=False, **common)
    if not isinstance(encoder, VisionTransformer):
        raise ValueError(f"model {model_name!r} is a {type(encoder).__name__}, not a timm VisionTransformer")
    return encoder


def sincos_pos_embed(grid: tuple[int, int], dim: int, prefix_tokens: int) -> Tensor:
    """(1, prefix + H*W, dim) fixed 2D sin-cos position embedding, zeros for the prefix (class) tokens."""
    grid_embed = build_sincos2d_pos_embed(list(grid), dim)  # (H*W, dim)
    return torch.cat([torch.zeros(prefix_tokens, dim), grid_embed]).unsqueeze(0)


class MaskedAutoencoder(nn.Module):
    """ViT encoder on the visible patches, light Transformer decoder reconstructing the masked ones.

    Args:
        encoder: a timm VisionTransformer (classifier-free); its `pos_embed` becomes fixed sin-cos.
        decoder_embed_dim: width of the decoder.
        decoder_depth: decoder blocks.
        decoder_num_heads: decoder attention heads.
        mask_ratio: share of patches removed per image.
        norm_pix_loss: regress per-patch standardised pixels (the paper's better-representation variant).

    Examples:
        >>> encoder = build_vit_encoder(model_name=None, img_size=8, patch_size=2, in_chans=1, embed_dim=32,
        ...                             depth=1, num_heads=2)
        >>> mae = MaskedAutoencoder(encoder, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
        >>> loss, pred, mask = mae(torch.rand(4, 1, 8, 8))
        >>> pred.shape, mask.shape
        (torch.Size([4, 16, 4]), torch.Size([4, 16]))
    """

    def __init__(
        self,
        encoder: VisionTransformer,
        *,
        decoder_embed_dim: int = 128,
        decoder_depth: int = 2,
        decoder_num_heads: int = 4,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio={mask_ratio}: must be in (0, 1)")
        self.encoder, self.mask_ratio, self.norm_pix_loss = encoder, mask_ratio, norm_pix_loss
        self.grid = tuple(encoder.patch_embed.grid_size)
        self.patch_size = encoder.patch_embed.patch_size[0]
        self.in_chans = encoder.patch_embed.proj.in_channels
        self.prefix = encoder.num_prefix_tokens if not getattr(encoder, "no_embed_class", False) else 0
        embed_dim = encoder.embed_dim
        encoder.pos_embed = nn.Parameter(sincos_pos_embed(self.grid, embed_dim, self.prefix), requires_grad=False)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed(self.grid, decoder_embed_dim, 1), requires_grad=False)
        self.decoder_blocks = nn.Sequential(*[
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(decoder_depth)
        ])
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.patch_size**2 * self.in_chans)
        self._init_weights()

    def _init_weights(self) -> None:
        """The official recipe: xavier-uniform linears (patch embedding as one), normal(0.02) tokens."""
        weight = self.encoder.patch_embed.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        if getattr(self.encoder, "cls_token", None) is not None:
            nn.init.normal_(self.encoder.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in [*self.encoder.blocks.modules(), *self.decoder_blocks.modules(), self.decoder_embed,
                       self.decoder_pred]:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def no_weight_decay(self) -> set[str]:
        """Tokens and (frozen) position embeddings are not decayed."""
        return {"encoder.cls_token", "encoder.reg_token", "encoder.pos_embed", "mask_token", "decoder_pos_embed"}

    def patchify(self, imgs: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, L, p*p*C), patches in row-major order, pixels (row, col, channel) inside."""
        p, (h, w) = self.patch_size, self.grid
        x = imgs.reshape(imgs.shape[0], self.in_chans, h, p, w, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(imgs.shape[0], h * w, p * p * self.in_chans)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, L, p*p*C) -> (B, C, H, W), the inverse of `patchify`."""
        p, (h, w) = self.patch_size, self.grid
        x = x.reshape(x.shape[0], h, w, p, p, self.in_chans)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], self.in_chans, h * p, w * p)

    def random_masking(self, x: Tensor, noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-sample shuffle by argsort of `noise` (B, L); keep the first int(L * (1 - mask_ratio)).

        Returns:
            x_visible (B, keep, D), mask (B, L) with 1 = removed in the original order, ids_restore (B, L).
        """
        batch, length, dim = x.shape
        keep = int(length * (1 - self.mask_ratio))
        ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :keep]
        x_visible = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
        mask = torch.ones(batch, length, device=x.device)
        mask[:, :keep] = 0
        return x_visible, torch.gather(mask, 1, ids_restore), ids_restore

    def forward_encoder(self, imgs: Tensor, noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, C, H, W) -> latent (B, prefix + keep, D), mask (B, L), ids_restore (B, L)."""
        enc = self.encoder
        x = enc.patch_embed(imgs) + enc.pos_embed[:, self.prefix :]
        x, mask, ids_restore = self.random_masking(x, noise)
        prefix = []
        if getattr(enc, "cls_token", None) is not None:
            prefix.append((enc.cls_token + enc.pos_embed[:, :1]).expand(x.shape[0], -1, -1))
        if getattr(enc, "reg_token", None) is not None:
            prefix.append(enc.reg_token.expand(x.shape[0], -1, -1))
        x = torch.cat([*prefix, x], dim=1)
        x = enc.norm(enc.blocks(enc.norm_pre(x)))
        return x, mask, ids_restore

    def forward_decoder(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """latent (B, prefix + keep, D) -> per-patch pixel predictions (B, L, p*p*C)."""
        n_prefix = self.encoder.num_prefix_tokens
        x = self.decoder_embed(latent)  # (B, prefix + keep, Dd)
        visible = x[:, n_prefix:]
        masked = self.mask_token.expand(x.shape[0], ids_restore.shape[1] - visible.shape[1], -1)
        tokens = torch.cat([visible, masked], dim=1)  # shuffled order
        tokens = torch.gather(tokens, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))  # original order
        summary = x[:, :1] if n_prefix else x.mean(dim=1, keepdim=True)  # class token (or mean) as prefix
        x = torch.cat([summary, tokens], dim=1) + self.decoder_pos_embed
        x = self.decoder_norm(self.decoder_blocks(x))
        return self.decoder_pred(x)[:, 1:]

    def forward_loss(self, imgs: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """Mean squared error on the masked patches only; per-patch standardised target with norm_pix_loss."""
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6).sqrt()
        per_patch = ((pred.float() - target.float()) ** 2).mean(dim=-1)  # (B, L)
        return (per_patch * mask).sum() / mask.sum()

    def forward(
        self, imgs: Tensor, noise: Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(B, C, H, W) -> (loss, pred (B, L, p*p*C), mask (B, L)); `noise` (B, L) fixes the masking."""
        if noise is None:
            noise = torch.rand(imgs.shape[0], self.num_patches, generator=generator).to(imgs.device)
        latent, mask, ids_restore = self.forward_encoder(imgs, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask
