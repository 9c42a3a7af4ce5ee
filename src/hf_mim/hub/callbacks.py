"""Makes every Hub push of a `Trainer` run loadable, not only the last one."""

import os

from transformers import TrainerCallback
from transformers.dynamic_module_utils import custom_object_save

from ..families import BY_MODEL_TYPE
from .cards import write_model_card


class HubFilesCallback(TrainerCallback):
    """With `push_to_hub`, writes into `output_dir` at the start of training what Trainer's pushes lack.

    With `hub_strategy="every_save"` (or `checkpoint`), each save uploads `output_dir` after copying
    only the config and weights into it, so without this the Hub holds an `auto_map` whose code files
    are missing until the final push, and nothing loads with `trust_remote_code=True` in between.
    This writes the config with the code files, the image processors of `subfolders` (e.g. `{"tokenizer":
    tokenizer_processor}` for a MIM model's tokenizer view) with their code also at the root (where
    transformers looks for it), and an hf_mim model card. A model of no hf_mim family (fine-tuning's stock
    `BeitForImageClassification`) has no code to add and is left to Trainer.

    Args:
        subfolders (`dict[str, image processor]`, *optional*):
            Image processors saved into subfolders of `output_dir`.
    """

    def __init__(self, subfolders: dict | None = None):
        self.subfolders = dict(subfolders or {})

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not (args.push_to_hub and state.is_world_process_zero) or model.config.model_type not in BY_MODEL_TYPE:
            return
        os.makedirs(args.output_dir, exist_ok=True)
        custom_object_save(model, args.output_dir)
        # Saving the config copies its code too, and keeps a MIM model's code to its own tokenizer family.
        model.config.save_pretrained(args.output_dir)
        for name, processor in self.subfolders.items():
            processor.save_pretrained(os.path.join(args.output_dir, name))
            custom_object_save(processor, args.output_dir)
        write_model_card(
            args.output_dir, config=model.config.to_dict(), repo_id=args.hub_model_id, training_args=args, trainer_state=state
        )


__all__ = ["HubFilesCallback"]
