"""Configuration of the VQ-KD visual tokenizer of BEiT v2 (arXiv 2208.06366)."""

from huggingface_hub.dataclasses import strict
from transformers import BeitConfig, PreTrainedConfig

from .configuration_common import complete_auto_map
from .configuration_transformer import check_transformer_settings


@strict
class VqkdConfig(PreTrainedConfig):
    r"""
    Configuration of [`VqkdModel`]: a ViT encoder whose patch features are quantised to an l2-normalised codebook,
    and a small ViT decoder trained to reconstruct a frozen teacher's patch features from the codes (vector-quantised
    knowledge distillation). The defaults are unilm's `vqkd_encoder_base_decoder_3x768x12_clip`: ViT-B/16 encoder,
    8192 codes of dimension 32, a 3-layer decoder, CLIP ViT-B/16 (512-d) teacher features.

    image_size (`int`, *optional*, defaults to 224):
        Side of the (square) input view in pixels.
    patch_size (`int`, *optional*, defaults to 16):
        Encoder patch size; the token grid is `image_size // patch_size` per side.
    num_channels (`int`, *optional*, defaults to 3):
        Number of image channels.
    hidden_size (`int`, *optional*, defaults to 768):
        Width of the encoder.
    num_hidden_layers (`int`, *optional*, defaults to 12):
        Depth of the encoder.
    num_attention_heads (`int`, *optional*, defaults to 12):
        Attention heads of the encoder.
    intermediate_size (`int`, *optional*, defaults to 3072):
        MLP width of the encoder.
    decoder_hidden_size (`int`, *optional*, defaults to 768):
        Width of the decoder (a ViT over the `grid_size x grid_size x codebook_dim` code map with 1x1 patches).
    decoder_layers (`int`, *optional*, defaults to 3):
        Depth of the decoder (unilm also released 1-layer decoders).
    decoder_attention_heads (`int`, *optional*, defaults to 12):
        Attention heads of the decoder.
    decoder_intermediate_size (`int`, *optional*, defaults to 3072):
        MLP width of the decoder.
    codebook_size (`int`, *optional*, defaults to 8192):
        Number of codes.
    codebook_dim (`int`, *optional*, defaults to 32):
        Dimension of the codes. Low dimensions keep the codebook in use (unilm#1556: 1024-d codes collapse).
    teacher_dim (`int`, *optional*, defaults to 512):
        Dimension of the teacher features the decoder reconstructs (512 for CLIP ViT-B/16, 768 for DINO ViT-B/16).
    ema_decay (`float`, *optional*, defaults to 0.99):
        Decay of the exponential moving average that updates the codes towards the mean of their assigned features.
    commitment_weight (`float`, *optional*, defaults to 1.0):
        Weight of the commitment loss (mean squared distance between the l2-normalised features and their codes).
    kmeans_init (`bool`, *optional*, defaults to `True`):
        Initialise the codebook by spherical k-means on the first training batch. If `False`, the codes start as
        random unit vectors.
    kmeans_iters (`int`, *optional*, defaults to 10):
        Iterations of that k-means.
    dead_code_restart_steps (`int`, *optional*, defaults to 100):
        Re-seed a code from the current batch's encoder outputs once it has not been selected (on any process) for
        this many consecutive training steps (looked for every this many steps). 0 disables it, as in the reference
        implementation; restarts are on by default because without them most codes die within the first steps
        after the k-means initialisation on a small dataset (README, "BEiT v2").
    logit_scale (`float`, *optional*, defaults to 100.0):
        Multiplies the cosine similarities that `get_codebook_logits` returns, so that a softmax over them (e.g.
        mc-BEiT's soft targets at temperature 4) is peaked rather than uniform. Token ids do not depend on it.
    hidden_act (`str`, *optional*, defaults to `"gelu"`):
        Activation of the transformer MLPs (exact erf GELU).
    layer_norm_eps (`float`, *optional*, defaults to 1e-6):
        LayerNorm epsilon of encoder and decoder.
    initializer_range (`float`, *optional*, defaults to 0.02):
        Standard deviation of the weight initialisation.
    with_decoder (`bool`, *optional*, defaults to `True`):
        Whether the model holds its decoder and `decode_task_layer` (codes -> teacher features), which only training
        uses. MIM models hold their tokenizer without them (their targets only need the encoder and codebook), which
        keeps 22M parameters of the released size out of every MIM checkpoint; such a model refuses `forward` and
        `decode_features` with an error saying where to get the decoder.

    Example:

    ```python
    >>> from hf_mim import VqkdConfig, VqkdModel

    >>> config = VqkdConfig()  # BEiT v2's tokenizer
    >>> config.grid_size
    14
    >>> tiny = VqkdConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    ...                   intermediate_size=64, decoder_hidden_size=32, decoder_layers=1, decoder_attention_heads=2,
    ...                   decoder_intermediate_size=64, codebook_size=64, teacher_dim=16)
    >>> model = VqkdModel(tiny)
    ```"""

    model_type = "hf_mim_vqkd"

    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    decoder_hidden_size: int = 768
    decoder_layers: int = 3
    decoder_attention_heads: int = 12
    decoder_intermediate_size: int = 3072
    codebook_size: int = 8192
    codebook_dim: int = 32
    teacher_dim: int = 512
    ema_decay: float = 0.99
    commitment_weight: float = 1.0
    kmeans_init: bool = True
    kmeans_iters: int = 10
    dead_code_restart_steps: int = 100
    logit_scale: float = 100.0
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    with_decoder: bool = True

    def __post_init__(self, **kwargs):
        for name in (
            "image_size",
            "patch_size",
            "num_channels",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "decoder_hidden_size",
            "decoder_layers",
            "decoder_attention_heads",
            "decoder_intermediate_size",
            "codebook_size",
            "codebook_dim",
            "teacher_dim",
            "kmeans_iters",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"VqkdConfig.{name} must be a positive integer, got {getattr(self, name)}")
        if self.image_size % self.patch_size != 0:
            raise ValueError(
                f"VqkdConfig.image_size={self.image_size} is not a multiple of patch_size={self.patch_size}; use e.g. "
                f"image_size={self.image_size // self.patch_size * self.patch_size}"
            )
        for width, heads in (("hidden_size", "num_attention_heads"), ("decoder_hidden_size", "decoder_attention_heads")):
            if getattr(self, width) % getattr(self, heads) != 0:
                raise ValueError(
                    f"VqkdConfig.{width}={getattr(self, width)} is not divisible by {heads}={getattr(self, heads)}"
                )
        check_transformer_settings(self)
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"VqkdConfig.ema_decay must lie in (0, 1), got {self.ema_decay} (BEiT v2 uses 0.99)")
        if self.dead_code_restart_steps < 0:
            raise ValueError(
                f"VqkdConfig.dead_code_restart_steps must be >= 0 (0 disables restarts), got {self.dead_code_restart_steps}"
            )
        if self.commitment_weight < 0 or self.logit_scale <= 0:
            raise ValueError(
                f"VqkdConfig needs commitment_weight >= 0 and logit_scale > 0, got {self.commitment_weight} and "
                f"{self.logit_scale}"
            )
        super().__post_init__(**kwargs)
        # The image processor registers itself in preprocessor_config.json, so only model classes go here.
        complete_auto_map(
            self, {"AutoConfig": "configuration_vqkd.VqkdConfig", "AutoModel": "modeling_vqkd.VqkdModel"}
        )

    @property
    def grid_size(self) -> int:
        """Tokens per side of the code grid."""
        return self.image_size // self.patch_size

    def _vit_config(self, **kwargs) -> BeitConfig:
        # The reference VQ-KD ViTs: absolute position embeddings, no relative position bias, no layer scale, no
        # stochastic depth, and a per-token `fc_norm` (BeitModel's mean-pooling LayerNorm, applied by VqkdModel).
        return BeitConfig(
            hidden_act=self.hidden_act,
            layer_norm_eps=self.layer_norm_eps,
            initializer_range=self.initializer_range,
            use_absolute_position_embeddings=True,
            use_relative_position_bias=False,
            use_shared_relative_position_bias=False,
            use_mask_token=False,
            use_mean_pooling=True,
            layer_scale_init_value=0.0,
            drop_path_rate=0.0,
            attn_implementation=self._attn_implementation,
            **kwargs,
        )

    def encoder_config(self) -> BeitConfig:
        """The `BeitConfig` of the encoder (pixels -> patch features)."""
        return self._vit_config(
            image_size=self.image_size,
            patch_size=self.patch_size,
            num_channels=self.num_channels,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
        )

    def decoder_config(self) -> BeitConfig:
        """The `BeitConfig` of the decoder: a ViT whose 'image' is the code map, one 1x1 patch per token."""
        return self._vit_config(
            image_size=self.grid_size,
            patch_size=1,
            num_channels=self.codebook_dim,
            hidden_size=self.decoder_hidden_size,
            num_hidden_layers=self.decoder_layers,
            num_attention_heads=self.decoder_attention_heads,
            intermediate_size=self.decoder_intermediate_size,
        )


__all__ = ["VqkdConfig"]
