"""Mixup and CutMix with label smoothing for fine-tuning (the batch mode of timm's `Mixup`, used by BEiT).

A training batch is mixed with itself in reverse order: Mixup blends whole images with weight `lam`,
CutMix pastes a box covering `1 - lam` of the image. The targets are the same blend of the two label
distributions, each smoothed (`label_smoothing / num_classes` off-target mass), so the loss is a
cross-entropy against soft targets ([`soft_target_cross_entropy`]).
"""

import math

import numpy as np
import torch

from ..data import numpy_rng_from_torch


def smooth_one_hot(labels: torch.Tensor, num_classes: int, label_smoothing: float = 0.0) -> torch.Tensor:
    """`(batch, num_classes)` targets: `1 - label_smoothing + label_smoothing / num_classes` at the label, the rest spread."""
    off_value = label_smoothing / num_classes
    targets = torch.full((labels.shape[0], num_classes), off_value, device=labels.device)
    return targets.scatter_(1, labels.long().unsqueeze(1), 1.0 - label_smoothing + off_value)


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy against class ids `(batch,)` or soft targets `(batch, num_classes)`, computed in fp32."""
    if targets.ndim == 1:
        return torch.nn.functional.cross_entropy(logits.float(), targets.long())
    return -(targets * torch.log_softmax(logits.float(), dim=-1)).sum(dim=-1).mean()


def cutmix_box(height: int, width: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A box `(top, bottom, left, right)` of about `(1 - lam)` of the image, centred uniformly, clipped to the image."""
    cut_ratio = math.sqrt(1.0 - lam)
    cut_height, cut_width = int(height * cut_ratio), int(width * cut_ratio)
    center_y, center_x = int(rng.integers(0, height)), int(rng.integers(0, width))
    top, bottom = np.clip([center_y - cut_height // 2, center_y + cut_height // 2], 0, height)
    left, right = np.clip([center_x - cut_width // 2, center_x + cut_width // 2], 0, width)
    return int(top), int(bottom), int(left), int(right)


class MixupCutmix:
    r"""Mixes a training batch and returns soft targets (also useful with both alphas at 0: label smoothing alone).

    Args:
        num_classes (`int`): Number of classes of the targets.
        mixup_alpha (`float`, *optional*, defaults to 0.8): Mixup's `lam ~ Beta(alpha, alpha)`; 0 disables Mixup.
        cutmix_alpha (`float`, *optional*, defaults to 1.0): CutMix's `lam ~ Beta(alpha, alpha)`; 0 disables CutMix.
        prob (`float`, *optional*, defaults to 1.0): Probability of mixing a batch at all.
        switch_prob (`float`, *optional*, defaults to 0.5): Probability of CutMix rather than Mixup when both are on.
        label_smoothing (`float`, *optional*, defaults to 0.1): Smoothing of the targets.
    """

    def __init__(
        self,
        num_classes: int,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.1,
    ):
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError(f"mixup_alpha and cutmix_alpha must be >= 0 (0 disables), got {mixup_alpha}, {cutmix_alpha}")
        for name, value in (("prob", prob), ("switch_prob", switch_prob), ("label_smoothing", label_smoothing)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        self.num_classes = num_classes
        self.mixup_alpha = mixup_alpha
        self.cutmix_alpha = cutmix_alpha
        self.prob = prob
        self.switch_prob = switch_prob
        self.label_smoothing = label_smoothing

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_classes={self.num_classes}, mixup_alpha={self.mixup_alpha}, "
            f"cutmix_alpha={self.cutmix_alpha}, prob={self.prob}, switch_prob={self.switch_prob}, "
            f"label_smoothing={self.label_smoothing})"
        )

    def __call__(
        self, pixel_values: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixed `pixel_values` `(batch, 3, H, W)` and soft targets `(batch, num_classes)` from class ids `(batch,)`.

        `rng` defaults to one seeded from torch's global RNG, so `set_seed` and resumed runs control it.
        """
        rng = numpy_rng_from_torch() if rng is None else rng
        lam, use_cutmix = 1.0, False
        if (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and rng.random() < self.prob:
            use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or rng.random() < self.switch_prob)
            alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
            lam = float(rng.beta(alpha, alpha))
        flipped = pixel_values.flip(0)
        if use_cutmix:
            height, width = pixel_values.shape[-2:]
            top, bottom, left, right = cutmix_box(height, width, lam, rng)
            pixel_values = pixel_values.clone()
            pixel_values[..., top:bottom, left:right] = flipped[..., top:bottom, left:right]
            # The clipped box decides how much of each image is left.
            lam = 1.0 - (bottom - top) * (right - left) / (height * width)
        elif lam < 1.0:
            pixel_values = pixel_values * lam + flipped * (1.0 - lam)
        targets = smooth_one_hot(labels, self.num_classes, self.label_smoothing)
        return pixel_values, targets * lam + targets.flip(0) * (1.0 - lam)


__all__ = ["MixupCutmix", "cutmix_box", "smooth_one_hot", "soft_target_cross_entropy"]
