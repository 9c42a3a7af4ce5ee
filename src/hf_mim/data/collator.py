"""Batch collation for masked image modeling: stack the views, drop undecodable images, draw masks."""

import logging
from collections.abc import Callable

import numpy as np
import torch

from .images import SkippedImageCounter


logger = logging.getLogger(__name__)


def decodable(example: dict | None) -> bool:
    """Whether a transformed example holds an image (`apply_transform` gives None, or `pixel_values` None, for an
    image that could not be decoded)."""
    return example is not None and example.get("pixel_values") is not None


class MimDataCollator:
    r"""Collates examples from [`TwoViewTransform`] (via `apply_transform`) into a MIM batch.

    Returns a dict with `pixel_values` `(B, 3, H, W)`, `tokenizer_pixel_values` `(B, 3, h, w)`
    when the examples have a tokenizer view, `bool_masked_pos` `(B, num_patches)` (bool,
    row-major over the patch grid, one fresh mask per example) when a mask generator is given,
    `bool_replaced_pos` `(B, num_patches)` when a replacement generator is given too, and any
    other example fields that are tensors or numbers, stacked (e.g. `labels`).

    Examples that are None or whose `pixel_values` is None (undecodable images) are dropped.
    If every example of a batch is dropped, an empty dict is returned: training loops must
    skip empty batches (`if not batch: continue`).

    Args:
        mask_generator (`Callable[[], np.ndarray]`, *optional*):
            Called once per example for a boolean `(grid_height, grid_width)` mask, e.g. a
            [`BlockwiseMaskingGenerator`]. An example that carries its own generator under `"rng"`
            (from `apply_transform(..., seed=...)`) gets its mask from it, as `mask_generator(rng)`;
            otherwise masks follow torch's RNG (per DataLoader worker).
        skipped ([`SkippedImageCounter`], *optional*):
            Counts the examples dropped here. `apply_transform` can count undecodable images
            instead; give a counter to one of the two, or each skip is counted twice.
        replacement_generator (`Callable[[np.ndarray], np.ndarray]`, *optional*):
            Called with each example's mask for a boolean grid of further patches to corrupt, e.g. a
            [`ReplacementPositionGenerator`] (CCViT's centroid replacement), with the example's `"rng"` as a second
            argument when it has one. Needs `mask_generator`.
    """

    def __init__(
        self,
        mask_generator: Callable[[], np.ndarray] | None = None,
        skipped: SkippedImageCounter | None = None,
        replacement_generator: Callable[[np.ndarray], np.ndarray] | None = None,
    ):
        if replacement_generator is not None and mask_generator is None:
            raise ValueError(
                "replacement_generator draws among the patches a mask leaves visible; give mask_generator too"
            )
        masked = getattr(mask_generator, "num_masking_patches", None)
        replaced = getattr(replacement_generator, "num_replaced_patches", None)
        num_patches = getattr(replacement_generator, "num_patches", None)
        # Caught here, before training, rather than by the first batch's replacement draw.
        if masked is not None and replaced is not None and masked + replaced > num_patches:
            raise ValueError(
                f"{masked} masked plus {replaced} replaced patches exceed the {num_patches} patches of the grid; "
                f"lower the masked count (--num_mask_patches / --mask_ratio) or the replaced count "
                f"(--num_replaced_patches) so that they sum to at most {num_patches}"
            )
        self.mask_generator = mask_generator
        self.skipped = skipped
        self.replacement_generator = replacement_generator

    def exact_counts(self) -> dict[str, int]:
        """`{"num_masked": ...}` (with `"num_replaced"` when patches are replaced too): the patches every image of
        this collator's batches masks (and replaces), when its generators draw exact counts; `{}` when they do not.
        Given to the model's forward, the counts let it gather the masked rows with static shapes: no device
        synchronisation per step, and one compiled graph."""
        generator = self.mask_generator
        if not (getattr(generator, "exact", False) and hasattr(generator, "num_masking_patches")):
            return {}
        counts = {"num_masked": generator.num_masking_patches}
        if self.replacement_generator is not None:
            if not hasattr(self.replacement_generator, "num_replaced_patches"):
                return {}
            counts["num_replaced"] = self.replacement_generator.num_replaced_patches
        return counts

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        kept = [example for example in examples if decodable(example)]
        if len(kept) < len(examples):
            if self.skipped is not None:
                self.skipped.increment(len(examples) - len(kept))
            if not kept:
                logger.warning("All %d examples of a batch were undecodable; returning an empty batch", len(examples))
                return {}
        batch = {}
        for key, value in kept[0].items():
            values = [example[key] for example in kept]
            if isinstance(value, torch.Tensor):
                batch[key] = torch.stack(values)
            elif isinstance(value, (int, float, bool, np.integer, np.floating)):
                batch[key] = torch.tensor(values)
        if self.mask_generator is not None:
            rngs = [example.get("rng") for example in kept]
            masks = np.stack([self.mask_generator() if rng is None else self.mask_generator(rng) for rng in rngs])
            batch["bool_masked_pos"] = torch.from_numpy(masks.reshape(len(kept), -1).astype(bool))
            if self.replacement_generator is not None:
                replaced = np.stack(
                    [
                        self.replacement_generator(mask) if rng is None else self.replacement_generator(mask, rng)
                        for mask, rng in zip(masks, rngs)
                    ]
                )
                batch["bool_replaced_pos"] = torch.from_numpy(replaced.reshape(len(kept), -1).astype(bool))
        return batch


__all__ = ["MimDataCollator", "decodable"]
