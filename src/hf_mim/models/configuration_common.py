"""Helpers shared by hf_mim configs and models."""

import math

from transformers.activations import ACT2FN

# The tags of every hf_mim checkpoint's card, also when transformers writes it (`model.push_to_hub`).
HUB_TAGS = ("hf_mim", "custom_code")


def complete_auto_map(config, auto_map: dict[str, str]) -> None:
    """Pre-fill `config.auto_map` with every Auto class of the family.

    `save_pretrained` only records the class that was saved; without the full map a checkpoint of
    a task model would not load through `AutoModel` with `trust_remote_code=True`.
    """
    existing = getattr(config, "auto_map", None) or {}
    config.auto_map = {**auto_map, **existing}


def decoder_left_out(config) -> bool:
    """Whether a tokenizer of `config` was built without its decoder (`with_decoder=False`, as MIM models hold it).

    False for families without the switch: k-means decodes through its centroids, and VQGAN never had a decoder.
    """
    return not getattr(config, "with_decoder", True)


def check_decoder(config, purpose: str) -> None:
    """Refuse to `purpose` with a tokenizer built without its decoder, saying where to get one."""
    if decoder_left_out(config):
        raise ValueError(
            f"This {config.model_type} tokenizer was built without its decoder (with_decoder=False), so it cannot "
            f"{purpose}. MIM checkpoints hold their tokenizer without the decoder, since targets only need the "
            "encoder. Load the standalone tokenizer checkpoint, which keeps it: AutoModel.from_pretrained(<the "
            "tokenizer folder or Hub id the pre-training used, run_mim.py --tokenizer_name_or_path>)."
        )


def check_transformer_settings(config) -> None:
    """Errors for a transformer's `hidden_act`, `layer_norm_eps` and `initializer_range` that no model can use: an
    unknown activation fails at construction with a KeyError, a negative std at initialisation, and a LayerNorm epsilon
    <= 0 divides by zero on a constant token (a non-finite loss that looks like divergence)."""
    prefix = type(config).__name__
    if isinstance(config.hidden_act, str) and config.hidden_act not in ACT2FN:
        raise ValueError(
            f"{prefix}.hidden_act={config.hidden_act!r} is not an activation transformers knows; use one of "
            f"{sorted(name for name in ACT2FN if name.startswith(('gelu', 'relu', 'silu', 'swish', 'tanh')))}"
        )
    if not (math.isfinite(config.layer_norm_eps) and config.layer_norm_eps > 0):
        raise ValueError(f"{prefix}.layer_norm_eps must be positive, got {config.layer_norm_eps} (BEiT uses 1e-6)")
    if not (math.isfinite(config.initializer_range) and config.initializer_range >= 0):
        raise ValueError(
            f"{prefix}.initializer_range is the std of the initial weights: >= 0, got {config.initializer_range} "
            "(BEiT uses 0.02)"
        )


__all__ = ["HUB_TAGS", "check_decoder", "check_transformer_settings", "complete_auto_map", "decoder_left_out"]
