"""The one visual-tokenizer protocol every hf_mim tokenizer implements.

A visual tokenizer maps an image (its own input view, produced by its own image processor) to a
grid of discrete codes, one per ViT patch, row-major. MIM models only ever talk to tokenizers
through this class, so any tokenizer (dVAE, VQ-KD, k-means centroids, VQGAN) can feed any
method that needs what it provides.
"""

import torch
from transformers import PreTrainedModel

from .configuration_common import HUB_TAGS


def code_counts(indices: torch.Tensor, codebook_size: int) -> torch.LongTensor:
    """How often each of the `codebook_size` codes occurs in `indices` (ids in `[0, codebook_size)`).

    Equal to `torch.bincount(indices.flatten(), minlength=codebook_size)`, but with the output size known in advance:
    bincount reads the largest id back to the host to size its output, a device synchronisation per call.
    """
    indices = indices.flatten()
    return indices.new_zeros(codebook_size).index_add_(0, indices, torch.ones_like(indices))


def host_scalars(*values: torch.Tensor) -> list[float]:
    """The 0-dim tensors `values` read back to the host together: one device synchronisation instead of one per value
    (input checks and data-dependent sizes of a training step)."""
    return torch.stack([value.detach().float() for value in values]).tolist()


def input_checked_on_host(module: torch.nn.Module, tensor: torch.Tensor) -> bool:
    """Whether `module` checks the values of its input `tensor` on the host this call, where a mistake raises a clear
    error: always on the CPU (the read costs nothing there); on an accelerator at the module's first call only, as a
    read per call would stall the device at every training step. Later calls check with `torch._assert_async`."""
    if tensor.device.type == "cpu":
        return True
    first = not getattr(module, "_input_checked_on_host", False)
    module._input_checked_on_host = True
    return first


class MimTokenizerPreTrainedModel(PreTrainedModel):
    """Base class of hf_mim visual tokenizers.

    Subclasses implement `get_codebook_logits` and, where a pixel decoder exists, `decode`.
    Their configs carry `image_size` (side of the tokenizer's input view, in pixels),
    `codebook_size` and `grid_size` (tokens per side).
    """

    main_input_name = "pixel_values"
    input_modalities = ("image",)

    def post_init(self):
        super().post_init()
        # Per instance: transformers' add_model_tags appends to the list.
        self.model_tags = list(HUB_TAGS)

    @property
    def grid_size(self) -> int:
        return self.config.grid_size

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def num_tokens(self) -> int:
        return self.config.grid_size**2

    def check_input(self, pixel_values: torch.Tensor) -> None:
        """Fails loudly on a view of the wrong size, which would silently give a wrong grid."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(
                f"{type(self).__name__} expects pixel_values of shape (batch, 3, H, W), got {tuple(pixel_values.shape)}"
            )
        size = self.config.image_size
        if tuple(pixel_values.shape[-2:]) != (size, size):
            raise ValueError(
                f"{type(self).__name__} expects {size}x{size} inputs (its image processor's view), got "
                f"{pixel_values.shape[-2]}x{pixel_values.shape[-1]}; build the tokenizer view with "
                f"AutoImageProcessor.from_pretrained(<tokenizer>) or TwoViewTransform"
            )

    def get_codebook_logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Scores of every code for every patch.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, image_size, image_size)`):
                The tokenizer's own input view, as its image processor produces it.

        Returns:
            `torch.FloatTensor` of shape `(batch_size, grid_size**2, codebook_size)`, row-major over the grid.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement get_codebook_logits")

    @torch.no_grad()
    def get_codebook_indices(self, pixel_values: torch.Tensor) -> torch.LongTensor:
        """Token ids of shape `(batch_size, grid_size**2)`, row-major over the grid (the ViT patch order)."""
        return self.get_codebook_logits(pixel_values).argmax(dim=-1)

    def decode(self, indices: torch.LongTensor) -> torch.Tensor:
        """Images in [0, 1] of shape `(batch_size, 3, H, W)` from token ids of shape `(batch_size, grid_size**2)`."""
        raise NotImplementedError(f"{type(self).__name__} has no pixel decoder")


__all__ = ["MimTokenizerPreTrainedModel", "code_counts", "host_scalars", "input_checked_on_host"]
