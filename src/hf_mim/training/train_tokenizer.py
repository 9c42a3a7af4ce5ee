"""Train a visual tokenizer (`--tokenizer_type dvae`, `vqkd`) with the transformers `Trainer`, or fit one
(`--tokenizer_type kmeans`, CCViT's centroids of raw patches) with Lloyd's k-means, on an image dataset.

    python scripts/train_tokenizer.py --tokenizer_type dvae --train_dir ./images --output_dir ./my-dvae \
        --max_steps 20000 --per_device_train_batch_size 64 --learning_rate 1e-3 --config_overrides codebook_size=1024

Works under `accelerate launch` with any number of processes. The output folder holds the model (safetensors),
its config and code, and the tokenizer's image processor, so `AutoModel.from_pretrained(output_dir)` (with hf_mim
installed, or `trust_remote_code=True` without) returns the trained tokenizer.
"""

import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import set_seed

from ..arguments import command_parser
from ..data import (
    MimDataCollator,
    SkippedImageCounter,
    StreamingImageDatasetArguments,
    TwoViewTransform,
    apply_transform,
    load_image_datasets_from_args,
)
from ..errors import UsageError
from ..hub.cards import hub_dataset_id
from ..models.configuration_dvae import DvaeConfig
from ..models.configuration_kmeans import KmeansConfig
from ..models.image_processing_dvae import DvaeImageProcessor
from ..models.image_processing_kmeans import KmeansImageProcessor
from ..models.modeling_dvae import DvaeModel
from ..models.modeling_kmeans import KmeansModel
from ..models.configuration_vqkd import VqkdConfig
from ..models.image_processing_vqkd import VqkdImageProcessor
from ..models.modeling_vqkd import VqkdModel
from .dvae import TEMPERATURE_SCHEDULES, build_dvae_trainer
from .kmeans import KmeansFitArguments, train_kmeans_tokenizer
from .loading import pretrained, saved_model_type
from .run_mim import MimTrainingArguments, parse_config_overrides, require_action, setup_logging, train_and_evaluate
from .vqkd import build_vqkd_trainer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenizerFamily:
    """What `main` needs to know about one tokenizer type."""

    config_class: type
    model_class: type
    image_processor_class: type
    # (model, training_args, tokenizer_args, **trainer_kwargs) -> Trainer; None for a tokenizer that is fitted instead
    build_trainer: Callable | None
    # (model, image_processor, raw_datasets, image_column, tokenizer_args, training_args, dataset_tags) -> metrics:
    # the whole run of a tokenizer that is not trained by gradient descent (k-means).
    fit: Callable | None = None


TOKENIZER_FAMILIES = {
    "dvae": TokenizerFamily(DvaeConfig, DvaeModel, DvaeImageProcessor, build_dvae_trainer),
    "vqkd": TokenizerFamily(VqkdConfig, VqkdModel, VqkdImageProcessor, build_vqkd_trainer),
    "kmeans": TokenizerFamily(
        KmeansConfig, KmeansModel, KmeansImageProcessor, None, fit=train_kmeans_tokenizer
    ),
}


@dataclass
class TokenizerArguments(KmeansFitArguments):
    tokenizer_type: str = field(
        default="dvae", metadata={"help": "Which tokenizer to train.", "choices": list(TOKENIZER_FAMILIES)}
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A saved tokenizer of --tokenizer_type (folder or Hub id) to continue training from; "
                  "unset: a new one."},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "Config changes, e.g. 'codebook_size=1024,hidden_size=64' (config.update_from_string); with "
                  "--tokenizer_name_or_path, only those that keep the weights' shapes, and the saved image processor "
                  "is rebuilt from the changed config when they change the view (image_size)."},
    )
    gumbel_temperature_start: float = field(default=1.0, metadata={"help": "Initial Gumbel temperature."})
    gumbel_temperature_end: float = field(default=1 / 16, metadata={"help": "Final Gumbel temperature."})
    gumbel_temperature_schedule: str = field(
        default="cosine", metadata={"help": "Temperature annealing curve.", "choices": list(TEMPERATURE_SCHEDULES)}
    )
    gumbel_anneal_fraction: float = field(
        default=1.0, metadata={"help": "Fraction of the steps over which the temperature is annealed."}
    )
    kl_weight: float = field(default=1e-3, metadata={"help": "Final weight of the KL term to the uniform prior."})
    kl_warmup_fraction: float = field(
        default=0.1, metadata={"help": "Fraction of the steps over which the KL weight ramps up from 0."}
    )
    diversity_weight: float = field(
        default=0.0,
        metadata={"help": "dVAE: weight of the KL of the batch's mean code posterior to uniform (keeps codes in use)."},
    )
    teacher_name_or_path: str | None = field(
        default=None,
        metadata={"help": "The vision model to distil (folder or Hub id), e.g. openai/clip-vit-base-patch16."},
    )
    teacher_feature_layer: int | None = field(
        default=None,
        metadata={"help": "Index into the teacher's hidden_states (default: its final features; CLIP: final "
                  "LayerNorm + visual projection)."},
    )


@dataclass
class DataArguments(StreamingImageDatasetArguments):
    cache_dir: str | None = field(default=None, metadata={"help": "Cache folder of Hub datasets."})
    crop_min_scale: float = field(
        default=0.08, metadata={"help": "Smallest random crop, as a fraction of the image area."}
    )
    color_jitter: float = field(default=0.0, metadata={"help": "Brightness/contrast/saturation jitter strength."})


def check_weight_shapes(model_class, saved_config, config, path: str, overrides: str) -> None:
    """A clear error, before any weight is read, for overrides that reshape the weights of a saved tokenizer."""
    with torch.device("meta"):
        saved_shapes = {name: tuple(value.shape) for name, value in model_class(saved_config).state_dict().items()}
        shapes = {name: tuple(value.shape) for name, value in model_class(config).state_dict().items()}
    changed = sorted(name for name in saved_shapes.keys() | shapes.keys() if saved_shapes.get(name) != shapes.get(name))
    if changed:
        raise UsageError(
            f"--config_overrides {overrides} changes the weights of the saved tokenizer {path} (e.g. {changed[0]}: "
            f"{saved_shapes.get(changed[0])} -> {shapes.get(changed[0])}); continued training keeps its architecture. "
            "Drop those overrides, or drop --tokenizer_name_or_path to train a new tokenizer with them."
        )


def load_tokenizer(tokenizer_args: TokenizerArguments):
    """The model and image processor to train: from `--tokenizer_name_or_path`, or fresh from the family defaults,
    with `--config_overrides` applied."""
    family = TOKENIZER_FAMILIES[tokenizer_args.tokenizer_type]
    path, overrides = tokenizer_args.tokenizer_name_or_path, tokenizer_args.config_overrides
    if path is not None:
        saved_type = saved_model_type(path)
        if saved_type is not None and saved_type != family.config_class.model_type:
            # Loading it anyway would start a fresh tokenizer with every weight missing and the other model's fields.
            raise UsageError(
                f"--tokenizer_name_or_path {path} holds a {saved_type} model, not a {tokenizer_args.tokenizer_type} "
                f"tokenizer ({family.config_class.model_type}); pass a folder saved by train_tokenizer.py "
                f"--tokenizer_type {tokenizer_args.tokenizer_type}, or drop the flag to train a new one"
            )
    saved_config = family.config_class() if path is None else pretrained(family.config_class.from_pretrained, path, "tokenizer_name_or_path")
    config = saved_config
    if overrides:
        logger.info("Overriding config: %s", overrides)
        # Building the config anew (rather than setting attributes) runs its validation on the overridden values.
        config = family.config_class.from_dict(
            {**saved_config.to_dict(), **parse_config_overrides(family.config_class, overrides)}
        )
    view = family.image_processor_class.for_config(config)
    if path is None:
        return family.model_class(config), view
    if overrides:
        check_weight_shapes(family.model_class, saved_config, config, path, overrides)
    model = family.model_class.from_pretrained(path, config=config)
    # The saved processor is the view of the saved config, possibly customised: an override that changes the view
    # (image_size, dVAE logit_laplace_eps) replaces it, any other keeps it.
    if view.to_dict() != family.image_processor_class.for_config(saved_config).to_dict():
        logger.info("--config_overrides %s changes the tokenizer's view; rebuilding its image processor", overrides)
        return model, view
    try:
        image_processor = family.image_processor_class.from_pretrained(path)
    except OSError:
        logger.warning("%s has no preprocessor_config.json; using the default processor for its config", path)
        image_processor = view
    return model, image_processor


def parse_args(argv: list[str] | None = None):
    """(TokenizerArguments, DataArguments, MimTrainingArguments) of `argv` (default `sys.argv[1:]`; a single `.json`
    path is read as a file)."""
    # MimTrainingArguments: TrainingArguments plus hf_mim's, keeping the raw image column (transformed on access) and
    # evaluating the loss only.
    parser = command_parser(
        (TokenizerArguments, DataArguments, MimTrainingArguments),
        description="""
        Train a visual tokenizer, whose codes are the targets of `hf-mim pretrain`: a dVAE (BEiT; Gumbel-softmax
        codes, trained to reconstruct the image) or a VQ-KD tokenizer (BEiT v2; codes trained to reconstruct a frozen
        teacher's features) with the transformers Trainer, or fit a k-means one (CCViT; centroids of raw patches,
        Lloyd's algorithm). Works under `accelerate launch` with any number of processes. --output_dir receives the
        model, its config and code, and the tokenizer's image processor: `AutoModel.from_pretrained(output_dir)`
        returns it (with hf_mim installed, or trust_remote_code=True without).

        examples:
          # dVAE with 1024 codes
          hf-mim train-tokenizer --tokenizer_type dvae --train_dir ./images --output_dir ./my-dvae --do_train \\
              --max_steps 20000 --per_device_train_batch_size 64 --learning_rate 1e-3 \\
              --config_overrides codebook_size=1024

          # VQ-KD distilling CLIP
          hf-mim train-tokenizer --tokenizer_type vqkd --teacher_name_or_path openai/clip-vit-base-patch16 \\
              --train_dir ./images --output_dir ./my-vqkd --do_train --num_train_epochs 100 --bf16

          # k-means: 8192 centroids of 16x16 patches of 50,000 images, 20 Lloyd iterations
          hf-mim train-tokenizer --tokenizer_type kmeans --train_dir ./images --output_dir ./ccvit-kmeans \\
              --do_train --kmeans_max_images 50000 --kmeans_iterations 20
        """,
        groups=[
            ("tokenizer", [TokenizerArguments]),
            ("dVAE (--tokenizer_type dvae)", [
                "gumbel_temperature_start", "gumbel_temperature_end", "gumbel_temperature_schedule",
                "gumbel_anneal_fraction", "kl_weight", "kl_warmup_fraction",
            ]),
            ("VQ-KD (--tokenizer_type vqkd)", ["teacher_name_or_path", "teacher_feature_layer"]),
            ("k-means fit (--tokenizer_type kmeans)", [KmeansFitArguments]),
            ("data", [StreamingImageDatasetArguments]),
            ("augmentation", ["crop_min_scale", "color_jitter"]),
        ],
        json_file=True,
    )  # fmt: skip
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(os.path.abspath(argv[0]))
    return parser.parse_args_into_dataclasses(args=argv)


def main(argv: list[str] | None = None, callbacks=None) -> dict[str, float]:
    """Parse the arguments (`argv`, default `sys.argv[1:]`; a single `.json` path is read as a file), train, save.
    `callbacks` are extra `TrainerCallback`s of a gradient-trained tokenizer (k-means fits have no Trainer).

    Returns the training metrics (and `eval_*` metrics with `--do_eval` and a validation split).
    """
    tokenizer_args, data_args, training_args = parse_args(argv)
    require_action(training_args)
    setup_logging(training_args)
    set_seed(training_args.seed)

    model, image_processor = load_tokenizer(tokenizer_args)
    raw, image_column = load_image_datasets_from_args(
        data_args, training_args.seed, data_args.cache_dir, require_validation=training_args.do_eval
    )
    family = TOKENIZER_FAMILIES[tokenizer_args.tokenizer_type]
    if family.build_trainer is None:
        dataset_tags = hub_dataset_id(data_args.dataset_name)
        return family.fit(model, image_processor, raw, image_column, tokenizer_args, training_args, dataset_tags)
    skipped = SkippedImageCounter()
    train_transform = TwoViewTransform(
        image_processor, crop_scale=(data_args.crop_min_scale, 1.0), color_jitter=data_args.color_jitter
    )
    train_dataset = apply_transform(raw["train"], image_column, train_transform, skipped=skipped)
    eval_dataset = None
    if training_args.do_eval:
        eval_transform = TwoViewTransform(image_processor, train=False)
        eval_dataset = apply_transform(raw["validation"], image_column, eval_transform, skipped=skipped)

    trainer = family.build_trainer(
        model,
        training_args,
        tokenizer_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=MimDataCollator(),
        processing_class=image_processor,
        callbacks=callbacks,
    )

    return train_and_evaluate(
        trainer, training_args, skipped, dataset_name=data_args.dataset_name, train_dir=data_args.train_dir
    )


__all__ = [
    "TOKENIZER_FAMILIES",
    "DataArguments",
    "TokenizerArguments",
    "TokenizerFamily",
    "check_weight_shapes",
    "load_tokenizer",
    "main",
]


if __name__ == "__main__":
    from ..cli import run_command

    run_command(main)
