"""Sharing hf_mim checkpoints on the Hugging Face Hub: model cards, upload folders, Trainer pushes."""

from .callbacks import HubFilesCallback
from .cards import CardResult, load_results, render_model_card, write_model_card
from .push import prepare_upload_folder, push_folder

__all__ = [
    "CardResult",
    "HubFilesCallback",
    "load_results",
    "prepare_upload_folder",
    "push_folder",
    "render_model_card",
    "write_model_card",
]
