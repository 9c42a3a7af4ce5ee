"""Optimiser parameter groups of the BEiT recipes: no-weight-decay sets and layer-wise learning-rate decay."""

import re

from torch import nn

# Parameter names (suffixes) that BEiT never decays besides biases and 1-d tensors. The mask token
# and the relative position bias table are decayed during pre-training, as in the reference code.
NO_WEIGHT_DECAY_NAMES = ("cls_token", "position_embeddings")

_LAYER_PATTERN = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def skips_weight_decay(name: str, parameter: nn.Parameter) -> bool:
    """BEiT's rule: no decay for 1-d tensors (LayerNorm, biases, q/v biases, layer scale) and the tokens."""
    return parameter.ndim <= 1 or name.endswith(".bias") or name.split(".")[-1] in NO_WEIGHT_DECAY_NAMES


def beit_layer_id(name: str, num_layers: int, backbone_prefix: str = "beit") -> int:
    """Depth of a parameter for layer-wise decay: 0 = embeddings, i + 1 = backbone layer i, L + 1 = the rest (heads)."""
    prefix = f"{backbone_prefix}."
    if not name.startswith(prefix):
        return num_layers + 1
    name = name[len(prefix) :]
    if name.startswith("embeddings."):
        return 0
    match = _LAYER_PATTERN.match(name)
    if match and name.startswith("layers."):
        return int(match.group(1)) + 1
    return num_layers + 1


def build_param_groups(
    model: nn.Module,
    weight_decay: float,
    learning_rate: float,
    layer_decay: float | None = None,
) -> list[dict]:
    """Parameter groups with BEiT's weight-decay exclusions and, if `layer_decay` is set, per-layer learning rates.

    With layer decay, layer id `i` gets `learning_rate * layer_decay ** (L + 1 - i)`: the embeddings learn
    slowest and the head at the full rate (BEiT fine-tuning, unilm `optim_factory.py`). Frozen parameters
    (e.g. a MIM model's tokenizer) are left out.
    """
    if layer_decay is not None and not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    prefix = getattr(model, "base_model_prefix", "beit")
    num_layers = model.config.num_hidden_layers if layer_decay is not None else 0
    groups: dict[tuple[int, bool], dict] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        layer_id = beit_layer_id(name, num_layers, prefix) if layer_decay is not None else 0
        no_decay = skips_weight_decay(name, parameter)
        group = groups.setdefault(
            (layer_id, no_decay),
            {
                "params": [],
                "names": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr": learning_rate * (layer_decay ** (num_layers + 1 - layer_id) if layer_decay else 1.0),
            },
        )
        group["params"].append(parameter)
        group["names"].append(name)
    return [groups[key] for key in sorted(groups)]


__all__ = ["NO_WEIGHT_DECAY_NAMES", "beit_layer_id", "build_param_groups", "skips_weight_decay"]
