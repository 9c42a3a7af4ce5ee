"""The DALL-E discrete VAE (Ramesh et al. 2021, arXiv 2102.12092) as an hf_mim visual tokenizer.

BEiT v1 uses OpenAI's frozen encoder to turn a 112x112 view into 14x14 token ids; the decoder turns ids
back into pixels (for visualisation, and to train a dVAE of one's own with `hf_mim.training.dvae`). The tokenizer
inside a MIM model is built without the decoder (`with_decoder=False`).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_common import check_decoder
from .configuration_dvae import DvaeConfig
from .modeling_tokenizer import MimTokenizerPreTrainedModel


@dataclass
class DvaeOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`, *optional*):
        `reconstruction_loss + kl_weight * kl_loss`, returned when `return_loss=True`.
    reconstruction_loss (`torch.FloatTensor` of shape `()`):
        Mean squared error between the reconstruction and the input, both in [0, 1] pixel units.
    kl_loss (`torch.FloatTensor` of shape `()`):
        KL divergence (nats) of the per-position code posterior to the uniform prior, averaged over positions.
    reconstruction (`torch.FloatTensor` of shape `(batch_size, num_channels, image_size, image_size)`):
        Decoded images in [0, 1].
    logits (`torch.FloatTensor` of shape `(batch_size, grid_size**2, codebook_size)`):
        Code logits of every grid position, row-major.
    indices (`torch.LongTensor` of shape `(batch_size, grid_size**2)`):
        The argmax code of every grid position, row-major (in training mode the decoder sees Gumbel-softmax samples
        instead).
    """

    loss: torch.FloatTensor | None = None
    reconstruction_loss: torch.FloatTensor | None = None
    kl_loss: torch.FloatTensor | None = None
    reconstruction: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    indices: torch.LongTensor | None = None


class DvaeResidualBlock(nn.Module):
    """`id_path(x) + post_gain * res_path(x)`, the residual path being four ReLU-conv pairs a quarter as wide.

    The small `post_gain = 1 / (num_groups * num_blocks_per_group)**2` keeps the deep stack close to the
    identity at initialisation, which is what lets DALL-E train it without normalisation layers.
    """

    kernel_sizes: tuple[int, int, int, int]

    def __init__(self, config: DvaeConfig, in_channels: int, out_channels: int):
        super().__init__()
        hidden_channels = out_channels // 4
        self.id_path = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        widths = (in_channels, hidden_channels, hidden_channels, hidden_channels, out_channels)
        k1, k2, k3, k4 = self.kernel_sizes
        self.conv_1 = nn.Conv2d(widths[0], widths[1], k1, padding=k1 // 2)
        self.conv_2 = nn.Conv2d(widths[1], widths[2], k2, padding=k2 // 2)
        self.conv_3 = nn.Conv2d(widths[2], widths[3], k3, padding=k3 // 2)
        self.conv_4 = nn.Conv2d(widths[3], widths[4], k4, padding=k4 // 2)
        self.post_gain = 1.0 / (config.num_groups * config.num_blocks_per_group) ** 2

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        residual = self.conv_1(F.relu(hidden_states))
        residual = self.conv_2(F.relu(residual))
        residual = self.conv_3(F.relu(residual))
        residual = self.conv_4(F.relu(residual))
        return self.id_path(hidden_states) + self.post_gain * residual


class DvaeEncoderBlock(DvaeResidualBlock):
    kernel_sizes = (3, 3, 3, 1)


class DvaeDecoderBlock(DvaeResidualBlock):
    kernel_sizes = (1, 3, 3, 3)


class DvaeEncoder(nn.Module):
    """7x7 stem, `num_groups` groups of residual blocks (width doubling, 2x max-pool between groups), ReLU and a
    1x1 projection to code logits."""

    def __init__(self, config: DvaeConfig):
        super().__init__()
        widths = [config.hidden_size * 2**group for group in range(config.num_groups)]
        self.input_conv = nn.Conv2d(config.num_channels, widths[0], 7, padding=3)
        self.groups = nn.ModuleList()
        in_channels = widths[0]
        for width in widths:
            self.groups.append(
                nn.ModuleList(
                    DvaeEncoderBlock(config, in_channels if block == 0 else width, width)
                    for block in range(config.num_blocks_per_group)
                )
            )
            in_channels = width
        self.output_conv = nn.Conv2d(widths[-1], config.codebook_size, 1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden_states = self.input_conv(pixel_values)
        for index, group in enumerate(self.groups):
            if index > 0:
                hidden_states = F.max_pool2d(hidden_states, kernel_size=2)
            for block in group:
                hidden_states = block(hidden_states)
        return self.output_conv(F.relu(hidden_states))


class DvaeDecoder(nn.Module):
    """The encoder mirrored: 1x1 projection of (relaxed) one-hot codes, groups of residual blocks (width halving,
    2x nearest upsampling between groups), ReLU and a 1x1 projection to `2 * num_channels` logit-Laplace
    parameters (the first `num_channels` are the logits of the pixel means)."""

    def __init__(self, config: DvaeConfig):
        super().__init__()
        widths = [config.hidden_size * 2**group for group in reversed(range(config.num_groups))]
        self.input_conv = nn.Conv2d(config.codebook_size, config.decoder_hidden_size, 1)
        self.groups = nn.ModuleList()
        in_channels = config.decoder_hidden_size
        for width in widths:
            self.groups.append(
                nn.ModuleList(
                    DvaeDecoderBlock(config, in_channels if block == 0 else width, width)
                    for block in range(config.num_blocks_per_group)
                )
            )
            in_channels = width
        self.output_conv = nn.Conv2d(widths[-1], 2 * config.num_channels, 1)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        hidden_states = self.input_conv(codes)
        for index, group in enumerate(self.groups):
            if index > 0:
                hidden_states = F.interpolate(hidden_states, scale_factor=2, mode="nearest")
            for block in group:
                hidden_states = block(hidden_states)
        return self.output_conv(F.relu(hidden_states))


class DvaePreTrainedModel(MimTokenizerPreTrainedModel):
    config: DvaeConfig
    config_class = DvaeConfig
    base_model_prefix = "dvae"
    _no_split_modules = ["DvaeEncoderBlock", "DvaeDecoderBlock"]
    # Token ids come from an fp32 forward whatever the load dtype, so they do not depend on the device. (The official
    # GPU pipeline ran every conv but the last in fp16, so its ids differ from these on a small fraction of patches.)
    _keep_in_fp32_modules_strict = ["encoder", "decoder"]

    @torch.no_grad()
    def _init_weights(self, module):
        # DALL-E's initialisation: unit-variance pre-activations (std 1/sqrt(fan_in)), zero biases.
        if isinstance(module, nn.Conv2d):
            fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
            init.normal_(module.weight, mean=0.0, std=fan_in**-0.5)
            if module.bias is not None:
                init.zeros_(module.bias)


class DvaeModel(DvaePreTrainedModel):
    """DALL-E's dVAE: `encoder` (pixels -> code logits) and `decoder` (codes -> pixels; `None` when
    `config.with_decoder` is False).

    Inputs are the [DvaeImageProcessor] output, i.e. pixels already mapped from [0, 1] to
    [eps, 1 - eps] (`0.8 * x + 0.1` for the released model).
    """

    # The submodules that `with_decoder=False` leaves out.
    decoder_modules = ("decoder",)

    def __init__(self, config: DvaeConfig):
        super().__init__(config)
        self.encoder = DvaeEncoder(config)
        self.decoder = DvaeDecoder(config) if config.with_decoder else None
        self.post_init()

    def _check_fp32(self) -> None:
        if self.encoder.output_conv.weight.dtype != torch.float32:
            raise ValueError(
                f"{type(self).__name__} computes tokens in float32 (half precision changes which code wins), but its "
                f"weights are {self.encoder.output_conv.weight.dtype}; call `.float()` on the tokenizer."
            )

    def _unmap_pixels(self, mapped: torch.Tensor) -> torch.Tensor:
        eps = self.config.logit_laplace_eps
        return (mapped - eps) / (1 - 2 * eps)

    def _pixel_means(self, decoder_output: torch.Tensor) -> torch.Tensor:
        """Unclamped [0, 1]-unit pixel means from the decoder's logit-Laplace parameters."""
        return self._unmap_pixels(torch.sigmoid(decoder_output[:, : self.config.num_channels].float()))

    def get_codebook_logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Code logits in float32 (autocast disabled): device-independent ids, where the official GPU pipeline's fp16
        convolutions differ from them on a small fraction of patches.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, image_size, image_size)`):
                The [DvaeImageProcessor] view: pixels mapped to [eps, 1 - eps].

        Returns:
            `torch.FloatTensor` of shape `(batch_size, grid_size**2, codebook_size)`, row-major over the grid.
        """
        self.check_input(pixel_values)
        self._check_fp32()
        with torch.autocast(device_type=pixel_values.device.type, enabled=False):
            logits = self.encoder(pixel_values.float())
        return logits.flatten(2).transpose(1, 2)

    def decode(self, indices: torch.LongTensor) -> torch.Tensor:
        """Images in [0, 1] of shape `(batch_size, num_channels, image_size, image_size)`.

        Args:
            indices (`torch.LongTensor` of shape `(batch_size, grid_size**2)` or `(batch_size, grid_size, grid_size)`):
                Code ids, row-major over the grid.
        """
        check_decoder(self.config, "decode tokens into pixels")
        grid, codebook_size = self.config.grid_size, self.config.codebook_size
        indices = indices.reshape(indices.shape[0], -1)
        if indices.shape[1] != grid * grid:
            raise ValueError(
                f"{type(self).__name__} decodes {grid}x{grid}={grid * grid} codes per image, got {indices.shape[1]}"
            )
        self._check_fp32()
        codes = F.one_hot(indices, codebook_size).to(torch.float32)
        codes = codes.transpose(1, 2).reshape(indices.shape[0], codebook_size, grid, grid)
        with torch.autocast(device_type=codes.device.type, enabled=False):
            decoded = self.decoder(codes)
        return self._pixel_means(decoded).clamp(0.0, 1.0)

    def forward(
        self,
        pixel_values: torch.Tensor,
        temperature: float = 1.0,
        kl_weight: float = 0.0,
        return_loss: bool = True,
    ) -> DvaeOutput:
        r"""
        In training mode the codes are a Gumbel-softmax relaxation of the posterior (DALL-E's training); in eval
        mode they are the one-hot argmax, so the reconstruction is what the token ids decode to.

        The reconstruction loss is the mean squared error in [0, 1] pixel units, not the paper's logit-Laplace
        likelihood: it trains reliably from scratch in a few hundred steps, while the likelihood's learned scales
        make short or small-data runs unstable. The decoder's scale channels are therefore unused.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, image_size, image_size)`):
                The [DvaeImageProcessor] view: pixels mapped to [eps, 1 - eps].
            temperature (`float`, *optional*, defaults to 1.0):
                Gumbel-softmax temperature (annealed towards 1/16 during training).
            kl_weight (`float`, *optional*, defaults to 0.0):
                Weight of the KL divergence to the uniform code prior in `loss`.
            return_loss (`bool`, *optional*, defaults to `True`):
                Whether to return `loss`.
        """
        check_decoder(self.config, "reconstruct images (its training forward; get_codebook_indices gives tokens)")
        self.check_input(pixel_values)
        logits = self.encoder(pixel_values)
        log_probs = logits.float().log_softmax(dim=1)
        indices = logits.argmax(dim=1)
        if self.training:
            codes = F.gumbel_softmax(logits.float(), tau=temperature, dim=1)
        else:
            codes = F.one_hot(indices, self.config.codebook_size).permute(0, 3, 1, 2).float()
        means = self._pixel_means(self.decoder(codes.to(logits.dtype)))
        reconstruction_loss = F.mse_loss(means, self._unmap_pixels(pixel_values.float()))
        kl_loss = (log_probs.exp() * log_probs).sum(dim=1).mean() + math.log(self.config.codebook_size)
        return DvaeOutput(
            loss=reconstruction_loss + kl_weight * kl_loss if return_loss else None,
            reconstruction_loss=reconstruction_loss,
            kl_loss=kl_loss,
            reconstruction=means.clamp(0.0, 1.0),
            logits=logits.flatten(2).transpose(1, 2),
            indices=indices.flatten(1),
        )


__all__ = [
    "DvaeDecoder",
    "DvaeDecoderBlock",
    "DvaeEncoder",
    "DvaeEncoderBlock",
    "DvaeModel",
    "DvaeOutput",
    "DvaePreTrainedModel",
    "DvaeResidualBlock",
]
