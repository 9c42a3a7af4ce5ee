"""VQ-KD, BEiT v2's visual tokenizer (arXiv 2208.06366): vector-quantised knowledge distillation.

A ViT encoder maps the image to one 32-d vector per patch; each vector is replaced by the most similar code of an
l2-normalised codebook, and a small ViT decoder must reconstruct a frozen teacher's patch features (CLIP for the
released tokenizers) from the codes alone. The code ids are BEiT v2's MIM targets. The codebook is not learned by
gradient descent but by an exponential moving average of the features assigned to each code, after a k-means
initialisation on the first batch.

The teacher is only needed for training and is not part of this model: `hf_mim.training.vqkd` computes its features
and passes them to `forward` as `target_features`.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.utils import ModelOutput

from .beit_backbone import MimBeitModel, init_beit_weights, trunc_normal_timm_
from .configuration_common import check_decoder
from .configuration_vqkd import VqkdConfig
from .distributed import all_gather_rows, all_reduce_, computed_on_main
from .modeling_tokenizer import MimTokenizerPreTrainedModel, code_counts, host_scalars, input_checked_on_host

# Rows of the (vectors x codes) similarity matrix computed at once by k-means; bounds its memory on large batches.
_KMEANS_CHUNK = 16384
# Float slack of the [0, 1] input check (values produced from 8-bit images are exact).
_PIXEL_RANGE_TOLERANCE = 1e-3


@dataclass
class VqkdOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`, *optional*):
        `reconstruction_loss + commitment_loss`, when `target_features` are given.
    reconstruction_loss (`torch.FloatTensor` of shape `()`, *optional*):
        Mean of `1 - cos(prediction, target)` over all patches, when `target_features` are given.
    commitment_loss (`torch.FloatTensor` of shape `()`):
        `commitment_weight` times the mean squared distance between the l2-normalised encoder features and their codes.
    codebook_restarts (`torch.FloatTensor` of shape `()`):
        Dead codes re-seeded in this training step (`dead_code_restart_steps`).
    indices (`torch.LongTensor` of shape `(batch_size, grid_size**2)`):
        Code ids, row-major over the grid.
    predicted_features (`torch.FloatTensor` of shape `(batch_size, grid_size**2, teacher_dim)`):
        The decoder's reconstruction of the teacher features.
    """

    loss: torch.FloatTensor | None = None
    reconstruction_loss: torch.FloatTensor | None = None
    commitment_loss: torch.FloatTensor | None = None
    codebook_restarts: torch.FloatTensor | None = None
    indices: torch.LongTensor | None = None
    predicted_features: torch.FloatTensor | None = None


@dataclass
class VqkdCodebookOutput(ModelOutput):
    r"""
    quantized (`torch.FloatTensor` of shape `(..., codebook_dim)`):
        Straight-through quantised unit vectors: the codes in the forward pass, the gradient of the l2-normalised
        features in the backward pass.
    indices (`torch.LongTensor` of shape `(...)`):
        Code ids.
    commitment_loss (`torch.FloatTensor` of shape `()`):
        `commitment_weight` times the mean squared distance between the normalised features and their codes.
    counts (`torch.FloatTensor` of shape `(codebook_size,)`):
        How often each code was selected (summed over processes while training).
    restarted_codes (`torch.FloatTensor` of shape `()`):
        How many dead codes were re-seeded in this step.
    """

    quantized: torch.FloatTensor | None = None
    indices: torch.LongTensor | None = None
    commitment_loss: torch.FloatTensor | None = None
    counts: torch.FloatTensor | None = None
    restarted_codes: torch.FloatTensor | None = None


@torch.no_grad()
def spherical_kmeans(vectors: torch.Tensor, num_clusters: int, iterations: int) -> torch.Tensor:
    """Unit-norm centroids `(num_clusters, dim)` of unit vectors `(n, dim)` by k-means under cosine similarity.

    Centroids start as a random subset of the vectors (drawn with replacement when there are fewer vectors than
    clusters); each iteration assigns every vector to its most similar centroid and moves each centroid to the
    normalised mean of its members. A centroid without members keeps its position.
    """
    if vectors.shape[0] >= num_clusters:
        start = torch.randperm(vectors.shape[0], device=vectors.device)[:num_clusters]
    else:
        start = torch.randint(0, vectors.shape[0], (num_clusters,), device=vectors.device)
    centroids = vectors[start]
    for _ in range(iterations):
        assignment = torch.cat(
            [(chunk @ centroids.T).argmax(dim=-1) for chunk in vectors.split(_KMEANS_CHUNK)]
        )
        sums = torch.zeros_like(centroids).index_add_(0, assignment, vectors)
        members = code_counts(assignment, num_clusters)
        centroids = torch.where((members > 0)[:, None], F.normalize(sums, dim=-1), centroids)
    return centroids


class VqkdCodebook(nn.Module):
    r"""BEiT v2's normalised-EMA vector quantiser, distributed-correct, with optional dead-code restarts.

    Buffers (saved with the model, never touched by the optimiser):
    - `weight` `(codebook_size, codebook_dim)`: the unit-norm codes.
    - `cluster_size` `(codebook_size,)`: EMA of how often each code is selected (statistics only).
    - `initted` `(1,)`: 1 once the codes exist. A codebook with `initted == 0` runs k-means on its first training
      batch; a loaded codebook has `initted == 1` and is never overwritten.
    - `unused_steps` `(codebook_size,)`: training steps since each code was last selected (for restarts).

    While training, the per-code counts and feature sums are summed over all processes before the EMA update,
    k-means runs once on the features of all processes and is broadcast from rank 0, and restarted codes are
    drawn on rank 0 and broadcast, so every process holds the same codebook.
    """

    def __init__(self, config: VqkdConfig):
        super().__init__()
        self.codebook_size = config.codebook_size
        self.codebook_dim = config.codebook_dim
        self.decay = config.ema_decay
        self.commitment_weight = config.commitment_weight
        self.kmeans_iters = config.kmeans_iters
        self.dead_code_restart_steps = config.dead_code_restart_steps
        self.register_buffer("weight", torch.zeros(config.codebook_size, config.codebook_dim))
        self.register_buffer("cluster_size", torch.zeros(config.codebook_size))
        self.register_buffer("initted", torch.zeros(1))
        self.register_buffer("unused_steps", torch.zeros(config.codebook_size, dtype=torch.long))
        # `initted` once read as 1: a frozen tokenizer then needs no device synchronisation per call to know it.
        self._known_initialised = False
        # Training calls since dead codes were last looked for; every process counts the same calls.
        self._steps_since_check = 0

    @property
    def is_initialised(self) -> bool:
        if not self._known_initialised:
            self._known_initialised = bool(self.initted.item())
        return self._known_initialised

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        # The loaded `initted` may be 0 (a codebook saved before its k-means): read it again.
        self._known_initialised = False

    def cosine_similarity(self, features: torch.Tensor) -> torch.Tensor:
        """Cosine similarity `(..., codebook_size)` of each feature vector `(..., codebook_dim)` to every code."""
        if not self.is_initialised:
            raise ValueError(
                "The VQ-KD codebook is not initialised (initted == 0): its codes are created by k-means on the first "
                "training batch. Train the tokenizer (scripts/train_tokenizer.py --tokenizer_type vqkd) or load a "
                "trained one with VqkdModel.from_pretrained."
            )
        return F.normalize(features.float(), dim=-1) @ self.weight.float().T

    @torch.no_grad()
    def initialise(self, vectors: torch.Tensor) -> None:
        """Spherical k-means on the unit `vectors` of all processes, computed on rank 0 and broadcast."""
        (vectors,) = all_gather_rows(vectors)
        centroids = computed_on_main(
            lambda: spherical_kmeans(vectors, self.codebook_size, self.kmeans_iters),
            self.weight.shape, vectors.dtype, vectors.device,
        )
        self.weight.copy_(centroids)
        self.cluster_size.zero_()
        self.unused_steps.zero_()
        self.initted.fill_(1.0)
        self._known_initialised = True

    @torch.no_grad()
    def update(
        self, vectors: torch.Tensor, indices: torch.LongTensor, counts: torch.Tensor, weight: float = 1.0
    ) -> torch.Tensor:
        """One EMA step from the unit `vectors` assigned to codes `indices`, their statistics scaled by `weight`;
        returns the all-process `counts`."""
        sums = torch.zeros_like(self.weight, dtype=vectors.dtype).index_add_(0, indices, vectors)
        # One collective for both statistics.
        statistics = torch.cat([counts[:, None], sums], dim=1)
        if weight != 1.0:
            # Weight zero adds exact zeros, not 0 x a non-finite feature.
            statistics = statistics * weight if weight else torch.zeros_like(statistics)
        all_reduce_(statistics)
        counts, sums = statistics[:, 0], statistics[:, 1:]
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        # The member mean of a code, normalised; codes nobody chose keep their vector.
        means = torch.where((counts > 0)[:, None], F.normalize(sums, dim=-1), self.weight)
        self.weight.copy_(F.normalize(self.decay * self.weight + (1 - self.decay) * means, dim=-1))
        return counts

    @torch.no_grad()
    def restart_dead_codes(self, vectors: torch.Tensor, counts: torch.Tensor) -> int:
        """Re-seed the codes unused for `dead_code_restart_steps` steps with random unit `vectors` of this step;
        `counts` are this step's all-process selection counts. Returns how many codes were restarted.

        Dead codes are looked for once every `dead_code_restart_steps` calls, not every call: finding them needs a
        host read, which would stall a GPU every step. A code is therefore restarted after `dead_code_restart_steps`
        to twice that many unused steps.
        """
        self.unused_steps.add_(1).masked_fill_(counts > 0, 0)
        self._steps_since_check += 1
        if self._steps_since_check < self.dead_code_restart_steps:
            return 0
        self._steps_since_check = 0
        dead = self.unused_steps >= self.dead_code_restart_steps
        # `counts` are summed over processes, so every process takes this branch together.
        num_dead = int(host_scalars(dead.sum())[0])
        if num_dead == 0:
            return 0
        replacements = computed_on_main(
            lambda: vectors[torch.randint(0, vectors.shape[0], (num_dead,), device=vectors.device)],
            (num_dead, self.codebook_dim), vectors.dtype, vectors.device,
        )
        self.weight[dead] = replacements.to(self.weight.dtype)
        self.unused_steps[dead] = 0
        return num_dead

    def forward(self, features: torch.Tensor, update_weight: float = 1.0) -> VqkdCodebookOutput:
        """Quantise `features` `(..., codebook_dim)`; while training, also update the codebook (see the class), the
        statistics of these features weighed by `update_weight` (0: they join the all-reduce of the EMA statistics and
        add nothing to them)."""
        with torch.autocast(device_type=features.device.type, enabled=False):
            vectors = F.normalize(features.float(), dim=-1)
            flat = vectors.reshape(-1, self.codebook_dim)
            if self.training and not self.is_initialised:
                self.initialise(flat.detach())
            indices = self.cosine_similarity(flat).argmax(dim=-1)
            # The codes as they were before this step's update.
            codes = self.weight.float()[indices]
            counts = code_counts(indices, self.codebook_size).float()
            restarted = 0
            if self.training:
                counts = self.update(flat.detach(), indices, counts, update_weight)
                if self.dead_code_restart_steps > 0:
                    restarted = self.restart_dead_codes(flat.detach(), counts)
            commitment_loss = self.commitment_weight * F.mse_loss(flat, codes)
            quantized = flat + (codes - flat).detach()
        return VqkdCodebookOutput(
            quantized=quantized.view_as(vectors),
            indices=indices.view(features.shape[:-1]),
            commitment_loss=commitment_loss,
            counts=counts,
            # Filled on the device (a tensor of a host value would be a copy that waits for the GPU).
            restarted_codes=features.new_full((), float(restarted), dtype=torch.float32),
        )


class VqkdPreTrainedModel(MimTokenizerPreTrainedModel):
    config: VqkdConfig
    config_class = VqkdConfig
    base_model_prefix = "vqkd"
    supports_gradient_checkpointing = True
    # Attention lives in the BEiT encoder and decoder, which pick up this model's attention implementation.
    _supports_sdpa = True
    _supports_attention_backend = True
    _no_split_modules = ["BeitLayer"]
    # Code assignment compares cosine similarities of 32-d vectors against thousands of codes; keep it in fp32.
    _keep_in_fp32_modules_strict = ["encode_task_layer", "codebook"]

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, VqkdCodebook):
            if self.config.kmeans_init:
                init.zeros_(module.weight)
                init.zeros_(module.initted)
                module._known_initialised = False
            else:
                init.copy_(module.weight, F.normalize(torch.randn_like(module.weight), dim=-1))
                init.ones_(module.initted)
            init.zeros_(module.cluster_size)
            init.zeros_(module.unused_steps)
        else:
            # The encoder and decoder are `VqkdBeitModel`s and initialise themselves; this covers the task layers.
            init_beit_weights(module, self.config, trunc_normal_timm_)


class VqkdBeitModel(MimBeitModel):
    """VQ-KD's encoder and decoder: BEiT's ViT initialised as the reference's fine-tuning ViT that VQ-KD builds on
    (weights, [CLS] and position embeddings N(0, 0.02²) untruncated, not ±1σ; the same 1/sqrt(2l) rescale)."""

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        init_beit_weights(module, self.config, trunc_normal_timm_)


class VqkdModel(VqkdPreTrainedModel):
    """The VQ-KD tokenizer: `encoder` + `encode_task_layer` -> `codebook` -> `decoder` + `decode_task_layer` (the
    last two `None` when `config.with_decoder` is False: only training needs them).

    Inputs are the [`VqkdImageProcessor`] view: pixels in [0, 1], not mean/std-normalised (the model maps them to
    [-1, 1] itself, as the released tokenizers expect).
    """

    # The submodules that `with_decoder=False` leaves out.
    decoder_modules = ("decoder", "decode_task_layer")

    def __init__(self, config: VqkdConfig):
        super().__init__(config)
        # BeitModel's mean-pooling LayerNorm (`pooler.layernorm`) is the reference's `fc_norm`; VQ-KD applies it to
        # every patch token, and keeping it there lets the encoder export to a stock transformers BEiT checkpoint.
        self.encoder = VqkdBeitModel(config.encoder_config(), add_pooling_layer=True)
        self.encode_task_layer = nn.Sequential(
            nn.Linear(config.hidden_size, config.hidden_size), nn.Tanh(), nn.Linear(config.hidden_size, config.codebook_dim)
        )
        self.codebook = VqkdCodebook(config)
        self.decoder = self.decode_task_layer = None
        if config.with_decoder:
            self.decoder = VqkdBeitModel(config.decoder_config(), add_pooling_layer=True)
            self.decode_task_layer = nn.Sequential(
                nn.Linear(config.decoder_hidden_size, config.decoder_hidden_size),
                nn.Tanh(),
                nn.Linear(config.decoder_hidden_size, config.teacher_dim),
            )
        self.post_init()

    def check_pixel_range(self, pixel_values: torch.Tensor) -> None:
        """Refuse inputs outside [0, 1]: normalised or 0-255 pixels would give plausible but meaningless tokens."""
        if torch.compiler.is_compiling():
            # The check reads the pixel range back to the host, which a compiled step must not do; eager calls check.
            return
        if not input_checked_on_host(self, pixel_values):
            low, high = pixel_values.aminmax()
            in_range = (low >= -_PIXEL_RANGE_TOLERANCE) & (high <= 1 + _PIXEL_RANGE_TOLERANCE)
            torch._assert_async(in_range, "VqkdModel expects pixels in [0, 1] (VqkdImageProcessor's view)")
            return
        low, high = host_scalars(*pixel_values.aminmax())
        if low < -_PIXEL_RANGE_TOLERANCE:
            raise ValueError(
                f"VqkdModel expects pixels in [0, 1] but got values down to {low:.3f}: these pixels look "
                "mean/std-normalised (e.g. the ViT's ImageNet-normalised view). Use VqkdImageProcessor (or "
                "AutoImageProcessor.from_pretrained(<tokenizer>)) for the tokenizer's view; it only rescales to [0, 1]."
            )
        if high > 1 + _PIXEL_RANGE_TOLERANCE:
            raise ValueError(
                f"VqkdModel expects pixels in [0, 1] but got values up to {high:.3f}: these look like 0-255 "
                "pixels. Use VqkdImageProcessor (or AutoImageProcessor.from_pretrained(<tokenizer>)), which rescales "
                "by 1/255."
            )

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pre-quantisation features `(batch_size, grid_size**2, codebook_dim)` of [0, 1] pixels."""
        self.check_input(pixel_values)
        self.check_pixel_range(pixel_values)
        hidden_states = self.encoder(pixel_values * 2.0 - 1.0).last_hidden_state[:, 1:]
        hidden_states = self.encoder.pooler.layernorm(hidden_states)
        with torch.autocast(device_type=pixel_values.device.type, enabled=False):
            return self.encode_task_layer(hidden_states.float())

    def decode_features(self, quantized: torch.Tensor) -> torch.Tensor:
        """Predicted teacher features `(batch_size, grid_size**2, teacher_dim)` from quantised codes
        `(batch_size, grid_size**2, codebook_dim)`."""
        check_decoder(self.config, "predict teacher features from codes")
        grid = self.config.grid_size
        code_map = quantized.transpose(1, 2).reshape(quantized.shape[0], self.config.codebook_dim, grid, grid)
        hidden_states = self.decoder(code_map).last_hidden_state[:, 1:]
        return self.decode_task_layer(self.decoder.pooler.layernorm(hidden_states))

    def get_codebook_logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`logit_scale` times the cosine similarity of every patch feature to every code.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, image_size, image_size)`):
                The [`VqkdImageProcessor`] view: pixels in [0, 1].

        Returns:
            `torch.FloatTensor` of shape `(batch_size, grid_size**2, codebook_size)`, row-major over the grid.
        """
        features = self.encode(pixel_values)
        with torch.autocast(device_type=pixel_values.device.type, enabled=False):
            return self.config.logit_scale * self.codebook.cosine_similarity(features)

    def forward(
        self,
        pixel_values: torch.Tensor,
        target_features: torch.Tensor | None = None,
        return_loss: bool = True,
        codebook_update_weight: float = 1.0,
    ) -> VqkdOutput:
        r"""
        In training mode the codebook is updated (k-means on the first batch, then an EMA step per call, summed over
        processes); in eval mode the forward is a pure function of its inputs.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, image_size, image_size)`):
                The [`VqkdImageProcessor`] view: pixels in [0, 1].
            target_features (`torch.FloatTensor` of shape `(batch_size, grid_size**2, teacher_dim)`, *optional*):
                The teacher's patch features of the same images (`hf_mim.training.vqkd.VqkdTeacher`).
            return_loss (`bool`, *optional*, defaults to `True`):
                Whether to return `loss` (needs `target_features`).
            codebook_update_weight (`float`, *optional*, defaults to 1.0):
                The weight of these images in the training-mode EMA step, whose statistics are summed over processes:
                0 for images that only take part in the step (a process whose own batch was undecodable).
        """
        # Checked before the codebook's training-mode update, which must not happen in a call that then fails.
        check_decoder(self.config, "run the distillation forward (get_codebook_indices gives tokens)")
        features = self.encode(pixel_values)
        quantized = self.codebook(features, update_weight=codebook_update_weight)
        predicted = self.decode_features(quantized.quantized)

        reconstruction_loss = loss = None
        if target_features is not None:
            expected = (predicted.shape[0], predicted.shape[1], self.config.teacher_dim)
            if tuple(target_features.shape) != expected:
                raise ValueError(
                    f"target_features must have shape (batch, grid_size**2, teacher_dim) = {expected}, got "
                    f"{tuple(target_features.shape)}; set VqkdConfig.teacher_dim to the teacher's feature size"
                )
            cosine = F.cosine_similarity(predicted.float(), target_features.float(), dim=-1)
            reconstruction_loss = (1 - cosine).mean()
            if return_loss:
                loss = reconstruction_loss + quantized.commitment_loss
        return VqkdOutput(
            loss=loss,
            reconstruction_loss=reconstruction_loss,
            commitment_loss=quantized.commitment_loss,
            codebook_restarts=quantized.restarted_codes,
            indices=quantized.indices,
            predicted_features=predicted,
        )


__all__ = [
    "VqkdBeitModel",
    "VqkdCodebook",
    "VqkdCodebookOutput",
    "VqkdModel",
    "VqkdOutput",
    "VqkdPreTrainedModel",
    "spherical_kmeans",
]
