"""Helpers shared by hf_mim configs."""


def complete_auto_map(config, auto_map: dict[str, str]) -> None:
    """Pre-fill `config.auto_map` with every Auto class of the family.

    `save_pretrained` only records the class that was saved; without the full map a checkpoint of
    a task model would not load through `AutoModel` with `trust_remote_code=True`.
    """
    existing = getattr(config, "auto_map", None) or {}
    config.auto_map = {**auto_map, **existing}


__all__ = ["complete_auto_map"]
