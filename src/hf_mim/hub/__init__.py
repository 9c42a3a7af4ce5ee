"""Sharing hf_mim checkpoints on the Hugging Face Hub: model cards, upload folders, Trainer pushes."""

from .callbacks import HubFilesCallback
from .cards import CARD_FAMILIES, CardResult, load_results, render_model_card, write_model_card
from .push import prepare_upload_folder, push_folder

__all__ = [
    "CARD_FAMILIES",
    "CardResult",
    "HubFilesCallback",
    "load_results",
    "prepare_upload_folder",
    "push_folder",
    "render_model_card",
    "write_model_card",
]
