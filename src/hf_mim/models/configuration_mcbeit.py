"""Configuration of mc-BEiT masked image modeling with multi-choice targets (arXiv 2203.15371)."""

from huggingface_hub.dataclasses import strict

from .configuration_beit import BeitMimConfig, tokenizer_config_from_dict


def tokenizer_provides_logits(config_dict: dict) -> bool:
    """Whether the tokenizer of `config_dict` scores every code (`get_codebook_logits`), which soft targets need.

    Decided from its config class alone (configuration files import no modeling files): the tokenizer protocol asks
    every family for logits, so a family that gives only ids says so with `provides_codebook_logits = False` on its
    config class.
    """
    return getattr(type(tokenizer_config_from_dict(config_dict)), "provides_codebook_logits", True)


@strict
class McBeitConfig(BeitMimConfig):
    r"""
    A [`BeitMimConfig`] whose masked patches are trained towards soft "multi-choice" targets instead of one token
    id: the tokenizer's code distribution, refined by the distributions of similar patches of the same image. Any
    hf_mim tokenizer with code logits serves (dVAE, VQ-KD, k-means, VQGAN; mc-BEiT used taming's VQGAN).

    target_temperature (`float`, *optional*, defaults to 4.0):
        Temperature of the softmax over the tokenizer's logits (the paper's tau). Higher is softer; towards 0 the
        targets become the tokenizer's one-hot ids.
    similarity_temperature (`float`, *optional*, defaults to 1.0):
        Temperature of the row softmax over the cosine similarities between patch features (tau_s).
    similarity_weight (`float`, *optional*, defaults to 0.2):
        Share of the similarity-refined distribution in the target (omega); 0 gives the plain soft labels.
    detach_similarity_features (`bool`, *optional*, defaults to `False`):
        Stop the gradient through the patch similarities. The reference code does not, so by default the loss also
        trains the backbone through the targets; `True` treats the targets as constants (an ablation).

    Example:

    ```python
    >>> from hf_mim import McBeitConfig, McBeitForMaskedImageModeling, VqganConfig

    >>> config = McBeitConfig(tokenizer_config=VqganConfig().to_dict())
    >>> model = McBeitForMaskedImageModeling(config)
    ```"""

    model_type = "hf_mim_mcbeit"
    auto_map_defaults = {
        "AutoConfig": "configuration_mcbeit.McBeitConfig",
        "AutoModel": "modeling_mcbeit.McBeitModel",
        "AutoModelForMaskedImageModeling": "modeling_mcbeit.McBeitForMaskedImageModeling",
    }

    target_temperature: float | int = 4.0
    similarity_temperature: float | int = 1.0
    similarity_weight: float | int = 0.2
    detach_similarity_features: bool = False

    def __post_init__(self, **kwargs):
        for name in ("target_temperature", "similarity_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"McBeitConfig.{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.similarity_weight <= 1.0:
            raise ValueError(
                f"McBeitConfig.similarity_weight must lie in [0, 1] (it mixes two distributions), got "
                f"{self.similarity_weight}; mc-BEiT uses 0.2"
            )
        if self.tokenizer_config is not None and not tokenizer_provides_logits(self.tokenizer_config):
            raise ValueError(
                f"mc-BEiT needs code logits, but the {self.tokenizer_config.get('model_type')} tokenizer does not "
                "implement get_codebook_logits; use a tokenizer that does (dVAE, VQ-KD, k-means, VQGAN) or train "
                "with hard targets (BeitMimConfig)"
            )
        super().__post_init__(**kwargs)


__all__ = ["McBeitConfig"]
