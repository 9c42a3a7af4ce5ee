"""Which tokenizer class serves which `model_type`, for MIM models that hold a tokenizer.

A MIM config stores its tokenizer's config as a plain dict (it may be any tokenizer family), and
the MIM model rebuilds the tokenizer from it; this table is the one place that resolves the dict
to classes, inside the remote-code closure so checkpoints load without hf_mim installed.
"""

from .configuration_dvae import DvaeConfig
from .configuration_kmeans import KmeansConfig
from .configuration_vqgan import VqganConfig
from .configuration_vqkd import VqkdConfig
from .modeling_dvae import DvaeModel
from .modeling_kmeans import KmeansModel
from .modeling_tokenizer import MimTokenizerPreTrainedModel
from .modeling_vqgan import VqganModel
from .modeling_vqkd import VqkdModel

TOKENIZER_CLASSES = {
    DvaeConfig.model_type: (DvaeConfig, DvaeModel),
    VqkdConfig.model_type: (VqkdConfig, VqkdModel),
    VqganConfig.model_type: (VqganConfig, VqganModel),
    KmeansConfig.model_type: (KmeansConfig, KmeansModel),
}


def _classes_for(config_dict: dict):
    model_type = config_dict.get("model_type")
    if model_type not in TOKENIZER_CLASSES:
        raise ValueError(
            f"Unknown tokenizer model_type {model_type!r}; hf_mim tokenizers are {sorted(TOKENIZER_CLASSES)}. "
            "Pass `tokenizer.config.to_dict()` of an hf_mim tokenizer as `tokenizer_config`."
        )
    return TOKENIZER_CLASSES[model_type]


def tokenizer_config_from_dict(config_dict: dict):
    """The tokenizer config object described by `config_dict` (a `to_dict()` of a tokenizer config)."""
    config_class, _ = _classes_for(config_dict)
    return config_class.from_dict(config_dict)


def build_tokenizer(config_dict: dict):
    """A randomly initialised, frozen tokenizer in eval mode; load weights into it afterwards."""
    _, model_class = _classes_for(config_dict)
    tokenizer = model_class(tokenizer_config_from_dict(config_dict))
    tokenizer.requires_grad_(False)
    return tokenizer.eval()


def mim_tokenizer_config(config_dict: dict) -> dict:
    """The tokenizer config a MIM model stores: `config_dict` with the decoder switched off (`with_decoder=False`).

    Targets only need the encoder side; the decoder would otherwise ride along in every MIM checkpoint and Hub push
    (43.8M parameters for the DALL-E dVAE, 22M for VQ-KD). A dict without the `with_decoder` key is kept as it is:
    its family has no such switch (k-means, VQGAN), or it comes from a MIM checkpoint saved before the switch existed,
    whose weights hold the decoder, so that checkpoint loads with its decoder and without missing or unexpected keys.
    """
    if "with_decoder" not in config_dict:
        return config_dict
    return {**config_dict, "with_decoder": False}


def tokenizer_provides_logits(config_dict: dict) -> bool:
    """Whether the tokenizer of `config_dict` implements `get_codebook_logits` (soft targets need it, ids do not)."""
    _, model_class = _classes_for(config_dict)
    return model_class.get_codebook_logits is not MimTokenizerPreTrainedModel.get_codebook_logits


__all__ = [
    "TOKENIZER_CLASSES",
    "build_tokenizer",
    "mim_tokenizer_config",
    "tokenizer_config_from_dict",
    "tokenizer_provides_logits",
]
