"""Helpers shared by hf_mim configs and models."""

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


__all__ = ["HUB_TAGS", "check_decoder", "complete_auto_map", "decoder_left_out"]
