"""Checks of the transformer settings shared by the configs of the models built on a ViT (the MIM families and VQ-KD);
a file of its own, so that the tokenizers without a transformer do not carry it."""

import math

from transformers.activations import ACT2FN


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


__all__ = ["check_transformer_settings"]
