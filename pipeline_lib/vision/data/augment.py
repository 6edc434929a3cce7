"""SimCLR's augmentations, applied to a whole batch on the training device with tensor ops.

Reference: Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations", ICML 2020,
appendix A: random resized crop, horizontal flip, colour jitter (p=0.8), grayscale (p=0.2), Gaussian blur.

Randomness and pixels are separate steps. `sample` draws every random choice for a batch, one row per image;
`apply` is a deterministic function of the images and those rows. The trainer samples for the global batch
from a step-seeded generator and each DDP process applies the rows of its own images, so N processes see
exactly the augmentations one process would. Nothing loops over images in Python:

- crop and flip are one affine map per image (`affine_grid` + bilinear `grid_sample`);
- brightness, contrast, saturation and hue are per-image blends and a YIQ rotation, in a random order per
  image as torchvision's `ColorJitter` does;
- grayscale uses the ITU-R 601 luma weights;
- Gaussian blur is a separable grouped convolution with a per-image sigma.

Colour-specific steps (saturation, hue, grayscale) assume RGB and are no-ops unless the images have 3 channels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

LUMA = (0.299, 0.587, 0.114)
# RGB -> YIQ; a hue shift is a rotation of the (I, Q) chroma plane.
RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))
YIQ_TO_RGB = tuple(map(tuple, torch.linalg.inv(torch.tensor(RGB_TO_YIQ, dtype=torch.float64)).tolist()))
JITTER_STEPS = 4  # brightness, contrast, saturation, hue
CROP_ATTEMPTS = 10  # as torchvision's RandomResizedCrop; rows with no valid draw keep the whole image


@dataclass(frozen=True)
class AugmentConfig:
    """SimCLR's augmentation strengths (defaults: MoCo v2/v3's recipe, SimCLR's with colour strength 0.5).

    Attributes:
        crop_scale: range of the crop's area as a fraction of the image.
        crop_ratio: range of the crop's aspect ratio (width / height, relative to the image's), log-uniform.
        flip_p: probability of a horizontal flip.
        jitter_p: probability of colour jitter.
        brightness: brightness factor drawn from [max(0, 1 - b), 1 + b].
        contrast: contrast factor drawn from [max(0, 1 - c), 1 + c].
        saturation: saturation factor drawn from [max(0, 1 - s), 1 + s].
        hue: hue shift drawn from [-hue, hue], in turns (0.5 = half the colour circle).
        grayscale_p: probability of converting to grayscale.
        blur_p: probability of a Gaussian blur.
        blur_sigma: range of the blur's standard deviation, in output pixels (kernel: ~10% of the side, odd).
    """

    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)

    def __post_init__(self) -> None:
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"crop_scale={self.crop_scale}: need 0 < min <= max <= 1 (fractions of the image area)")
        low, high = self.crop_ratio
        if not 0 < low <= high:
            raise ValueError(f"crop_ratio={self.crop_ratio}: need 0 < min <= max (aspect ratios)")
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}={getattr(self, name)}: a probability must be in [0, 1]")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 0 (factors are drawn from 1 ± it)")
        if not 0 <= self.hue <= 0.5:
            raise ValueError(f"hue={self.hue}: must be in [0, 0.5] (a shift in turns of the colour circle)")
        low, high = self.blur_sigma
        if not 0 < low <= high:
            raise ValueError(f"blur_sigma={self.blur_sigma}: need 0 < min <= max")


def _uniform(low: float, high: float, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator, device=generator.device)


def _bernoulli(p: float, size: int, generator: torch.Generator) -> Tensor:
    return torch.rand(size, generator=generator, device=generator.device) < p


def _column(values: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, 1, 1) in the images' dtype, for broadcasting over (B, C, H, W)."""
    return values.to(like.dtype).view(-1, 1, 1, 1)


def _rows(flags: Tensor) -> Tensor:
    """(B,) bool -> (B, 1, 1, 1), to select whole images with `torch.where`."""
    return flags.view(-1, 1, 1, 1)


def _luma(images: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, 1, H, W) brightness: ITU-R 601 luma for RGB, the channel mean otherwise."""
    if images.shape[1] != 3:
        return images.mean(dim=1, keepdim=True)
    weights = images.new_tensor(LUMA).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


def _blend(images: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    """factor * images + (1 - factor) * other, clamped to [0, 1] (torchvision's `_blend`)."""
    return (factor * images + (1 - factor) * other).clamp(0, 1)


def adjust_brightness(images: Tensor, factor: Tensor) -> Tensor:
    return _blend(images, torch.zeros_like(images), _column(factor, images))


def adjust_contrast(images: Tensor, factor: Tensor) -> Tensor:
    mean = _luma(images).mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    return _blend(images, mean, _column(factor, images))


def adjust_saturation(images: Tensor, factor: Tensor) -> Tensor:
    if images.shape[1] != 3:
        return images
    return _blend(images, _luma(images), _column(factor, images))


def adjust_hue(images: Tensor, shift: Tensor) -> Tensor:
    """Rotate each image's chroma by `shift` turns in YIQ space: one 3x3 colour matrix per image."""
    if images.shape[1] != 3:
        return images
    to_yiq = images.new_tensor(RGB_TO_YIQ)
    angle = -2 * math.pi * shift.to(images.dtype)  # (B,) sign: positive shifts turn red towards green, as HSV
    cos, sin = angle.cos(), angle.sin()
    rotation = torch.zeros(len(shift), 3, 3, dtype=images.dtype, device=images.device)  # (B, 3, 3)
    rotation[:, 0, 0] = 1
    rotation[:, 1, 1], rotation[:, 1, 2], rotation[:, 2, 1], rotation[:, 2, 2] = cos, -sin, sin, cos
    matrix = images.new_tensor(YIQ_TO_RGB) @ rotation @ to_yiq  # (B, 3, 3) RGB -> RGB
    return torch.einsum("bij,bjhw->bihw", matrix, images).clamp(0, 1)


def to_grayscale(images: Tensor) -> Tensor:
    return _luma(images).expand_as(images)


def gaussian_blur(images: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Blur each image with its own sigma: separable, grouped (one group per image channel), reflect-padded."""
    B, C, H, W = images.shape
    radius = kernel_size // 2
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)  # (k,)
    sigma = sigma.to(images.dtype).clamp_min(1e-3).view(-1, 1)  # (B, 1)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(C, dim=0)  # (B*C, k)
    mode = "reflect" if radius < min(H, W) else "replicate"  # reflect needs more pixels than the radius
    flat = F.pad(images.reshape(1, B * C, H, W), (radius, radius, radius, radius), mode=mode)
    flat = F.conv2d(flat, kernel.view(B * C, 1, 1, -1), groups=B * C)  # along width
    flat = F.conv2d(flat, kernel.view(B * C, 1, -1, 1), groups=B * C)  # along height
    return flat.view(B, C, H, W)


class BatchAugment:
    """SimCLR augmentations for (B, C, H, W) float images in [0, 1], batched on the images' device.

    Args:
        cfg: augmentation strengths.
        out_size: side of the square output views.

    Examples:
        >>> augment = BatchAugment(AugmentConfig(), out_size=8)
        >>> images = torch.rand(4, 1, 8, 8)
        >>> params = augment.sample(4, torch.Generator().manual_seed(0), images.device)
        >>> augment.apply(images, params).shape
        torch.Size([4, 1, 8, 8])
    """

    def __init__(self, cfg: AugmentConfig, out_size: int) -> None:
        if out_size < 1:
            raise ValueError(f"out_size={out_size}: must be a positive number of pixels")
        self.cfg = cfg
        self.out_size = out_size
        self.blur_kernel_size = max(3, round(0.1 * out_size) // 2 * 2 + 1)  # ~10% of the side, odd

    def sample(self, batch_size: int, generator: torch.Generator, device: torch.device | str) -> dict[str, Tensor]:
        """All random choices for a batch, one row per image, drawn from `generator` and moved to `device`.

        Returns:
            crop: (B, 4) float, crop box (left, top, width, height) as fractions of the image side.
            flip: (B,) bool, flip horizontally.
            jitter: (B,) bool, apply colour jitter.
            brightness, contrast, saturation: (B,) float factors (1 = unchanged).
            hue: (B,) float shift in turns (0 = unchanged).
            jitter_order: (B, 4) long, order of (brightness, contrast, saturation, hue) = (0, 1, 2, 3).
            grayscale: (B,) bool, convert to grayscale.
            blur_sigma: (B,) float, Gaussian blur sigma in output pixels; 0 = no blur.
        """
        cfg, B, g = self.cfg, batch_size, generator
        params = {"crop": self._sample_crop(B, g), "flip": _bernoulli(cfg.flip_p, B, g),
                  "jitter": _bernoulli(cfg.jitter_p, B, g)}
        for name in ("brightness", "contrast", "saturation"):
            strength = getattr(cfg, name)
            params[name] = _uniform(max(0.0, 1 - strength), 1 + strength, (B,), g)
        params["hue"] = _uniform(-cfg.hue, cfg.hue, (B,), g)
        params["jitter_order"] = torch.rand(B, JITTER_STEPS, generator=g, device=g.device).argsort(dim=1)
        params["grayscale"] = _bernoulli(cfg.grayscale_p, B, g)
        blur = _bernoulli(cfg.blur_p, B, g)
        params["blur_sigma"] = torch.where(blur, _uniform(*cfg.blur_sigma, (B,), g), 0.0)
        return {name: value.to(device) for name, value in params.items()}

    def _sample_crop(self, batch_size: int, generator: torch.Generator) -> Tensor:
        """(B, 4) boxes as torchvision's RandomResizedCrop draws them: up to 10 tries, else the whole image."""
        shape = (batch_size, CROP_ATTEMPTS)
        area = _uniform(*self.cfg.crop_scale, shape, generator)
        ratio = torch.exp(_uniform(*(math.log(r) for r in self.cfg.crop_ratio), shape, generator))
        width, height = (area * ratio).sqrt(), (area / ratio).sqrt()  # (B, tries)
        valid = (width <= 1) & (height <= 1)
        first = valid.int().argmax(dim=1, keepdim=True)  # first valid try (0 when none is)
        found = valid.any(dim=1)
        width = torch.where(found, width.gather(1, first).squeeze(1), 1.0)
        height = torch.where(found, height.gather(1, first).squeeze(1), 1.0)
        left = torch.rand(batch_size, generator=generator, device=generator.device) * (1 - width)
        top = torch.rand(batch_size, generator=generator, device=generator.device) * (1 - height)
        return torch.stack([left, top, width, height], dim=1)

    def apply(self, images: Tensor, params: dict[str, Tensor]) -> Tensor:
        """(B, C, H, W) float in [0, 1] -> (B, C, out_size, out_size) in [0, 1]; deterministic given `params`."""
        if images.ndim != 4 or not images.is_floating_point():
            raise ValueError(f"images must be float (B, C, H, W) in [0, 1], got {images.dtype} {tuple(images.shape)}")
        if len(params["crop"]) != len(images):
            raise ValueError(f"params are for {len(params['crop'])} images, got a batch of {len(images)}")
        out = self.crop_and_flip(images, params["crop"], params["flip"])
        out = torch.where(_rows(params["jitter"]), self.color_jitter(out, params), out)
        out = torch.where(_rows(params["grayscale"]), to_grayscale(out), out)
        blurred = gaussian_blur(out, params["blur_sigma"], self.blur_kernel_size)
        out = torch.where(_rows(params["blur_sigma"] > 0), blurred, out)
        return out.clamp(0, 1)

    def crop_and_flip(self, images: Tensor, crop: Tensor, flip: Tensor) -> Tensor:
        """Resample each crop box to out_size x out_size (bilinear), mirrored where `flip`."""
        crop = crop.to(images.dtype)
        left, top, width, height = crop.unbind(dim=1)  # (B,) each, fractions of the side
        sign = 1 - 2 * flip.to(images.dtype)  # -1 mirrors the output's x axis
        # affine_grid maps output coordinates in [-1, 1] to input coordinates in [-1, 1].
        theta = torch.zeros(len(images), 2, 3, dtype=images.dtype, device=images.device)
        theta[:, 0, 0], theta[:, 0, 2] = width * sign, 2 * left + width - 1
        theta[:, 1, 1], theta[:, 1, 2] = height, 2 * top + height - 1
        size = (len(images), images.shape[1], self.out_size, self.out_size)
        grid = F.affine_grid(theta, list(size), align_corners=False)  # (B, S, S, 2)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def color_jitter(self, images: Tensor, params: dict[str, Tensor]) -> Tensor:
        """Brightness, contrast, saturation and hue, each image in its own order."""
        steps = (
            lambda x: adjust_brightness(x, params["brightness"]),
            lambda x: adjust_contrast(x, params["contrast"]),
            lambda x: adjust_saturation(x, params["saturation"]),
            lambda x: adjust_hue(x, params["hue"]),
        )
        out = images
        for position in range(JITTER_STEPS):
            chosen = params["jitter_order"][:, position]  # (B,) which step each image takes now
            after = out
            for index, step in enumerate(steps):
                after = torch.where(_rows(chosen == index), step(out), after)
            out = after
        return out

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """Sample for this batch from `generator`, then apply."""
        return self.apply(images, self.sample(len(images), generator, images.device))


@dataclass(frozen=True)
class StrongConfig:
    """FixMatch's strong view for small images: one random affine map per image, then cutout.

    Reference: Sohn et al., "FixMatch", NeurIPS 2020 (strong = RandAugment + Cutout). On 8x8 digits colour
    operations carry no information, so the geometric part is kept and drawn continuously.

    Attributes:
        rotation: degrees, uniform in [-rotation, rotation].
        shift: per axis, uniform in [-shift, shift] as a fraction of the side.
        scale: zoom factor range, uniform.
        shear: degrees along x, uniform in [-shear, shear].
        cutout: side of the square hole as a fraction of the image side, uniform in the range; (0, 0): off.
        fill: the value cutout writes (FixMatch's grey).
    """

    rotation: float = 30.0
    shift: float = 0.25
    scale: tuple[float, float] = (0.8, 1.2)
    shear: float = 20.0
    cutout: tuple[float, float] = (0.125, 0.5)
    fill: float = 0.5

    def __post_init__(self) -> None:
        low, high = self.scale
        if not 0 < low <= high:
            raise ValueError(f"scale={self.scale}: need 0 < min <= max")
        low, high = self.cutout
        if not 0 <= low <= high <= 1:
            raise ValueError(f"cutout={self.cutout}: need 0 <= min <= max <= 1 (fractions of the side)")


class StrongAugment:
    """A random affine map (rotation, shift, scale, shear) and cutout for (B, C, H, W) images in [0, 1], batched.

    As `BatchAugment`: `sample` draws every choice for a batch, `apply` is deterministic given them.
    """

    def __init__(self, cfg: StrongConfig, out_size: int) -> None:
        if out_size < 1:
            raise ValueError(f"out_size={out_size}: must be a positive number of pixels")
        self.cfg, self.out_size = cfg, out_size

    def sample(self, batch_size: int, generator: torch.Generator, device: torch.device | str) -> dict[str, Tensor]:
        """Returns:
            theta: (B, 2, 3) maps from output to input coordinates in [-1, 1] (`affine_grid`'s convention).
            cutout: (B, 3) the hole's centre (x, y) and side, as fractions of the image side; side 0: none.
        """
        cfg, B, g = self.cfg, batch_size, generator
        angle = torch.deg2rad(_uniform(-cfg.rotation, cfg.rotation, (B,), g))
        shear = torch.deg2rad(_uniform(-cfg.shear, cfg.shear, (B,), g))
        scale = _uniform(*cfg.scale, (B,), g)
        shift = _uniform(-cfg.shift, cfg.shift, (B, 2), g) * 2  # fractions of the side -> [-1, 1] units
        cos, sin = angle.cos(), angle.sin()
        rotation = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)  # (B, 2, 2)
        shearing = torch.eye(2).repeat(B, 1, 1)
        shearing[:, 0, 1] = shear.tan()
        linear = rotation @ shearing / scale.view(-1, 1, 1)  # zooming in samples a smaller input area
        theta = torch.cat([linear, shift.unsqueeze(2)], dim=2)
        centre = torch.rand(B, 2, generator=g, device=g.device)
        side = _uniform(*cfg.cutout, (B, 1), g)
        return {"theta": theta.to(device), "cutout": torch.cat([centre, side], dim=1).to(device)}

    def apply(self, images: Tensor, params: dict[str, Tensor]) -> Tensor:
        """(B, C, H, W) float in [0, 1] -> (B, C, out_size, out_size) in [0, 1]; outside the image is 0."""
        if images.ndim != 4 or not images.is_floating_point():
            raise ValueError(f"images must be float (B, C, H, W) in [0, 1], got {images.dtype} {tuple(images.shape)}")
        if len(params["theta"]) != len(images):
            raise ValueError(f"params are for {len(params['theta'])} images, got a batch of {len(images)}")
        size = [len(images), images.shape[1], self.out_size, self.out_size]
        grid = F.affine_grid(params["theta"].to(images.dtype), size, align_corners=False)  # (B, S, S, 2)
        out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        centre, side = params["cutout"][:, :2], params["cutout"][:, 2:]  # (B, 2), (B, 1)
        pixels = (torch.arange(self.out_size, device=images.device, dtype=images.dtype) + 0.5) / self.out_size
        inside_x = (pixels.view(1, -1) - centre[:, :1]).abs() < side / 2  # (B, S) columns in the hole
        inside_y = (pixels.view(1, -1) - centre[:, 1:]).abs() < side / 2  # (B, S) rows in the hole
        hole = (inside_y.unsqueeze(2) & inside_x.unsqueeze(1)).unsqueeze(1)  # (B, 1, S, S)
        return torch.where(hole, torch.full_like(out, self.cfg.fill), out).clamp(0, 1)
