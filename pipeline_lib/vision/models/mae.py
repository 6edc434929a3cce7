"""Masked autoencoder (He et al. 2021, "Masked Autoencoders Are Scalable Vision Learners") on a timm ViT.

The model is a row of named steps: `patchify`, `random_masking`, `forward_encoder`, `forward_decoder`,
`forward_loss`. The encoder is a real timm `VisionTransformer` (its patch embedding, prefix tokens, blocks and
norm), so the exported encoder loads into timm as it is; its position embedding is replaced by fixed 2D
sin-cos values, as in the official recipe (facebookresearch/mae `models_mae.py`).
"""

from __future__ import annotations

import timm
import torch
from timm.layers import PatchEmbed, build_sincos2d_pos_embed
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
    global_pool: str = "token",
) -> VisionTransformer:
    """A randomly initialised timm ViT without a classifier (`num_classes=0`); nothing is downloaded.

    Args:
        model_name: a timm ViT name (`vit_small_patch16_224`), built with this image size, patch size and input
            channels; None builds a custom `VisionTransformer` from `embed_dim`, `depth` and `num_heads`.
        img_size: input side in pixels, a multiple of `patch_size` (8 for the digits).
        patch_size: patch side in pixels.
        in_chans: input channels.
        embed_dim: token width (custom ViT only; a named model keeps its own).
        depth: transformer blocks (custom ViT only).
        num_heads: attention heads (custom ViT only).
        drop_path_rate: stochastic depth, rising linearly over the blocks to this rate.
        global_pool: pooled features: "token" (the class token) or "avg" (the mean of the patch tokens). Either
            way the final norm applies to every token (`fc_norm=False`), so MAE trains the same encoder.

    Raises:
        ValueError: `img_size` is not a multiple of `patch_size`, or `model_name` is not a timm ViT.
    """
    if img_size % patch_size:
        raise ValueError(f"image size {img_size} is not a multiple of the patch size {patch_size}")
    common = {"img_size": img_size, "patch_size": patch_size, "in_chans": in_chans, "num_classes": 0,
              "drop_path_rate": drop_path_rate, "global_pool": global_pool, "fc_norm": False}
    if model_name is None:
        return VisionTransformer(embed_dim=embed_dim, depth=depth, num_heads=num_heads, **common)
    if not timm.is_model(model_name):
        raise ValueError(f"unknown timm model {model_name!r}")
    try:
        encoder = timm.create_model(model_name, pretrained=False, **common)
    except TypeError as error:  # e.g. a CNN's constructor rejects img_size / patch_size
        raise ValueError(f"model {model_name!r} is not a timm VisionTransformer ({error})") from error
    if not isinstance(encoder, VisionTransformer):
        raise ValueError(f"model {model_name!r} is a {type(encoder).__name__}, not a timm VisionTransformer")
    return encoder


def sincos_pos_embed(grid: tuple[int, int], dim: int, prefix_tokens: int) -> Tensor:
    """(1, prefix + H*W, dim) fixed 2D sin-cos position embedding (float32), zeros for the prefix tokens.

    Patches are in row-major order, as `PatchEmbed` flattens them. timm lays the channels out as
    [sin(row * f), sin(col * f), cos(row * f), cos(col * f)] with the MAE frequencies f_k = 1 / 10000^(k / (dim/4)),
    k < dim/4: the same features as the official `get_2d_sincos_pos_embed`, in another (fixed) channel order.
    """
    if dim % 4:
        raise ValueError(f"a 2D sin-cos position embedding needs a width divisible by 4, got {dim}")
    grid_embed = build_sincos2d_pos_embed(list(grid), dim)  # (H*W, dim)
    return torch.cat([torch.zeros(prefix_tokens, dim), grid_embed]).unsqueeze(0)


def encoder_features(encoder: VisionTransformer, imgs: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, D) pooled features of the whole (unmasked) image, for kNN and linear probes.

    The timm path (`forward_features`, then `forward_head(pre_logits=True)`): the class token or the token mean,
    as the encoder's `global_pool` says. Call it in eval mode (and under `torch.no_grad()` for probes) so that
    dropout and stochastic depth are off.
    """
    return encoder.forward_head(encoder.forward_features(imgs), pre_logits=True)


class MaskedAutoencoder(nn.Module):
    """ViT encoder on the visible patches, light Transformer decoder reconstructing the masked ones.

    The encoder is modified in place: its `pos_embed` becomes a frozen (requires_grad=False) sin-cos
    Parameter of the same shape, so `encoder.state_dict()` keeps timm's keys. Prefix tokens (class token,
    register tokens) go through the encoder and the decoder and are dropped before the pixel prediction.

    Args:
        encoder: a timm VisionTransformer with a `PatchEmbed`, square patches and a position embedding.
        decoder_embed_dim: width of the decoder (divisible by 4 and by `decoder_num_heads`).
        decoder_depth: decoder blocks.
        decoder_num_heads: decoder attention heads.
        mask_ratio: share of patches removed per image, in (0, 1).
        norm_pix_loss: regress per-patch standardised pixels (the paper's better-representation variant).

    Examples:
        >>> encoder = build_vit_encoder(model_name=None, img_size=8, patch_size=2, in_chans=1, embed_dim=32,
        ...                             depth=1, num_heads=2)
        >>> mae = MaskedAutoencoder(encoder, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
        >>> loss, pred, mask = mae(torch.rand(4, 1, 8, 8))
        >>> pred.shape, mask.shape, int(mask.sum())
        (torch.Size([4, 16, 4]), torch.Size([4, 16]), 48)
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
        _check_encoder(encoder)
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio={mask_ratio}: must be in (0, 1)")
        if decoder_embed_dim % decoder_num_heads:
            raise ValueError(f"decoder_num_heads={decoder_num_heads} must divide decoder_embed_dim={decoder_embed_dim}")
        self.encoder, self.mask_ratio, self.norm_pix_loss = encoder, mask_ratio, norm_pix_loss
        self.grid: tuple[int, int] = tuple(encoder.patch_embed.grid_size)
        self.patch_size: int = encoder.patch_embed.patch_size[0]
        self.in_chans: int = encoder.patch_embed.proj.in_channels
        self.num_prefix_tokens: int = encoder.num_prefix_tokens  # class + register tokens
        # timm's pos_embed has slots for the prefix tokens unless no_embed_class (then they get no position)
        self.pos_prefix = 0 if encoder.no_embed_class else self.num_prefix_tokens
        pos_embed = sincos_pos_embed(self.grid, encoder.embed_dim, self.pos_prefix)
        encoder.pos_embed = nn.Parameter(pos_embed, requires_grad=False)  # (1, pos_prefix + L, D)

        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        decoder_pos = sincos_pos_embed(self.grid, decoder_embed_dim, self.num_prefix_tokens)
        self.decoder_pos_embed = nn.Parameter(decoder_pos, requires_grad=False)  # (1, prefix + L, Dd)
        self.decoder_blocks = nn.Sequential(*[
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(decoder_depth)
        ])
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.patch_size**2 * self.in_chans)
        self._init_weights()

    def _init_weights(self) -> None:
        """The official recipe: xavier-uniform linears (patch embedding as one), normal(0.02) tokens."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)  # qkv as one matrix, as in the JAX ViT
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        weight = self.encoder.patch_embed.proj.weight  # (D, C, p, p): a linear map of the flattened patch
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        for token in (self.encoder.cls_token, self.encoder.reg_token, self.mask_token):
            if token is not None:
                nn.init.normal_(token, std=0.02)

    @property
    def num_patches(self) -> int:
        """L, patches per image."""
        return self.grid[0] * self.grid[1]

    def no_weight_decay(self) -> set[str]:
        """Tokens and (frozen) position embeddings are not decayed."""
        return {"encoder.cls_token", "encoder.reg_token", "encoder.pos_embed", "mask_token", "decoder_pos_embed"}

    def patchify(self, imgs: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, L, p*p*C), patches in row-major order, pixels (row, col, channel) inside."""
        p, (h, w) = self.patch_size, self.grid
        if tuple(imgs.shape[1:]) != (self.in_chans, h * p, w * p):
            raise ValueError(f"images of shape {tuple(imgs.shape)}: expected (B, {self.in_chans}, {h * p}, {w * p})")
        x = imgs.reshape(imgs.shape[0], self.in_chans, h, p, w, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(imgs.shape[0], h * w, p * p * self.in_chans)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, L, p*p*C) -> (B, C, H, W), the inverse of `patchify`."""
        p, (h, w) = self.patch_size, self.grid
        x = x.reshape(x.shape[0], h, w, p, p, self.in_chans)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], self.in_chans, h * p, w * p)

    def random_masking(self, x: Tensor, noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-sample shuffle by argsort of `noise`; keep the first int(L * (1 - mask_ratio)) tokens.

        Args:
            x: tokens (B, L, D).
            noise: (B, L), uniform in [0, 1); the tokens with the smallest noise are kept.

        Returns:
            x_visible (B, keep, D); mask (B, L) float32, 0 keep / 1 removed, in the original order;
            ids_restore (B, L), which puts [kept, removed] back in the original order.
        """
        batch, length, dim = x.shape
        keep = int(length * (1 - self.mask_ratio))
        ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :keep]
        x_visible = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
        mask = torch.ones(batch, length, device=x.device, dtype=torch.float32)
        mask[:, :keep] = 0  # in shuffled order, then unshuffled
        return x_visible, torch.gather(mask, 1, ids_restore), ids_restore

    def forward_encoder(self, imgs: Tensor, noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, C, H, W) -> latent (B, prefix + keep, D), mask (B, L), ids_restore (B, L).

        Positions are added before masking; the prefix tokens (with their zero position) join after it. No
        position dropout or patch dropout: masking is the regulariser.
        """
        enc = self.encoder
        x = enc.patch_embed(imgs)  # (B, L, D); (B, h, w, D) for dynamic_img_size
        x = x.reshape(x.shape[0], -1, x.shape[-1]) + enc.pos_embed[:, self.pos_prefix :]
        x, mask, ids_restore = self.random_masking(x, noise)  # (B, keep, D)
        prefix = [token for token in (enc.cls_token, enc.reg_token) if token is not None]
        if prefix:
            tokens = torch.cat(prefix, dim=1)  # (1, prefix, D)
            if self.pos_prefix:  # zeros from sincos_pos_embed, added so a loaded non-zero slot is honoured
                tokens = tokens + enc.pos_embed[:, : self.pos_prefix]
            x = torch.cat([tokens.expand(x.shape[0], -1, -1), x], dim=1)
        x = enc.norm(enc.blocks(enc.norm_pre(x)))
        return x, mask, ids_restore

    def forward_decoder(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """latent (B, prefix + keep, D), ids_restore (B, L) -> per-patch pixel predictions (B, L, p*p*C)."""
        n_prefix = self.num_prefix_tokens
        x = self.decoder_embed(latent)  # (B, prefix + keep, Dd)
        visible = x[:, n_prefix:]
        masked = self.mask_token.to(x.dtype).expand(x.shape[0], ids_restore.shape[1] - visible.shape[1], -1)
        tokens = torch.cat([visible, masked], dim=1)  # (B, L, Dd), shuffled order
        tokens = torch.gather(tokens, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))  # original order
        x = torch.cat([x[:, :n_prefix], tokens], dim=1) + self.decoder_pos_embed  # (B, prefix + L, Dd)
        x = self.decoder_norm(self.decoder_blocks(x))
        return self.decoder_pred(x)[:, n_prefix:]

    def forward_loss(self, imgs: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """Mean squared error over the masked patches only, computed in float32.

        Args:
            imgs: (B, C, H, W) targets.
            pred: (B, L, p*p*C) predictions.
            mask: (B, L), 1 for the masked patches that count.

        Returns:
            The scalar loss. With `norm_pix_loss` the target is each patch standardised by its own mean and
            (unbiased) variance, eps 1e-6, as in the official code.
        """
        target = self.patchify(imgs).float()
        if self.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6).sqrt()
        per_patch = ((pred.float() - target) ** 2).mean(dim=-1)  # (B, L)
        mask = mask.float()
        return (per_patch * mask).sum() / mask.sum()

    def forward(
        self, imgs: Tensor, noise: Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(B, C, H, W) -> (loss, pred (B, L, p*p*C), mask (B, L)).

        Args:
            imgs: normalised images.
            noise: (B, L) masking noise; fixes the mask. Drawn uniform if None.
            generator: draws the noise when `noise` is None, on the generator's own device (so a CPU generator
                gives the same masks for images on any device).
        """
        if noise is None:
            device = generator.device if generator is not None else imgs.device
            noise = torch.rand(imgs.shape[0], self.num_patches, generator=generator, device=device)
        latent, mask, ids_restore = self.forward_encoder(imgs, noise.to(imgs.device))
        pred = self.forward_decoder(latent, ids_restore)  # (B, L, p*p*C)
        return self.forward_loss(imgs, pred, mask), pred, mask


def _check_encoder(encoder: nn.Module) -> None:
    """Reject encoders the MAE steps cannot drive, with the reason."""
    if not isinstance(encoder, VisionTransformer):
        raise ValueError(f"MAE needs a timm VisionTransformer encoder, got {type(encoder).__name__}")
    if not isinstance(encoder.patch_embed, PatchEmbed):
        raise ValueError(f"MAE needs a plain PatchEmbed, got {type(encoder.patch_embed).__name__}")
    patch_h, patch_w = encoder.patch_embed.patch_size
    if patch_h != patch_w:
        raise ValueError(f"MAE needs square patches, got {patch_h}x{patch_w}")
    if encoder.pos_embed is None:
        raise ValueError("MAE needs an encoder with an absolute position embedding (built with pos_embed='none')")
