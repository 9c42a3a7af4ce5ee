"""Training a visual tokenizer as a library: `train_tokenizer` is `hf-mim train-tokenizer`.

The tokenizer (`--tokenizer_type`) is an entry of `hf_mim.families.TOKENIZERS` that hf_mim trains with its `Trainer`
(dVAE, VQ-KD) or fits without gradients (k-means, CCViT's centroids of raw patches, Lloyd's algorithm). Works under
`accelerate launch` with any number of processes. The output folder holds the model (safetensors), its config and
code, and the tokenizer's image processor, so `AutoModel.from_pretrained(output_dir)` (with hf_mim installed, or
`trust_remote_code=True` without) returns the trained tokenizer.
"""

import dataclasses
import logging
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments, set_seed

from ..arguments import flags_set
from ..data import (
    MimDataCollator,
    RenderingArguments,
    SkippedImageCounter,
    StreamingImageDatasetArguments,
    TwoViewTransform,
    apply_transform,
    load_image_datasets_from_args,
)
from ..errors import UsageError
from ..families import TOKENIZERS, import_target
from ..hub.cards import hub_dataset_id
from .arguments import (
    MimTrainingArguments,
    config_from_flags,
    parse_config_overrides,
    warn_of_transformers_optimisation_defaults,
)
from .dvae import DVAE_FLAGS, TEMPERATURE_SCHEDULES, check_schedule
from .kmeans import KmeansFitArguments
from .loading import pretrained, require_output_dir_of, saved_model_type
from .workflow import (
    require_action,
    require_no_earlier_model,
    require_steps_when_streaming,
    require_weights_to_evaluate,
    run_flags,
    setup_logging,
    train_and_evaluate,
)

logger = logging.getLogger(__name__)

# `--tokenizer_type`: the registered tokenizers that hf_mim trains or fits (the others are converted from releases).
TRAINABLE = {name: tokenizer for name, tokenizer in TOKENIZERS.items() if tokenizer.trainable}


@dataclass
class TokenizerArguments(KmeansFitArguments):
    tokenizer_type: str = field(
        default="dvae", metadata={"help": "Which tokenizer to train.", "choices": list(TRAINABLE)}
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
        default=0.5,
        metadata={
            "help": "Fraction of the steps over which the temperature is annealed; the rest trains at the end value, "
            "where code balancing revives the codes that died as it fell (1.0: anneal until the last step)."
        },
    )
    kl_weight: float = field(
        default=1e-2, metadata={"help": "Final weight of the KL term to the uniform prior (dVAE; the README's measurements)."}
    )
    kl_warmup_fraction: float = field(
        default=0.1, metadata={"help": "Fraction of the steps over which the KL weight ramps up from 0."}
    )
    code_balance_rate: float = field(
        default=0.05,
        metadata={"help": "dVAE: per-step change of each code's encoder bias towards an even use of the codebook "
                  "(0: DALL-E's recipe, no balancing)."},
    )
    teacher_name_or_path: str | None = field(
        default=None,
        metadata={"help": "The frozen vision model (folder or Hub id) that VQ-KD distils (e.g. "
                  "openai/clip-vit-base-patch16) or whose patch features feature k-means clusters (e.g. "
                  "facebook/dinov2-base, or an hf_mim encoder folder)."},
    )
    teacher_feature_layer: int | None = field(
        default=None,
        metadata={"help": "Index into the teacher's hidden_states (default: its final features; CLIP: final "
                  "LayerNorm + visual projection)."},
    )

    def __post_init__(self):
        super().__post_init__()
        schedule = {argument: getattr(self, flag) for argument, flag in DVAE_FLAGS.items()}
        check_schedule(**schedule, flags=DVAE_FLAGS)


@dataclass
class DataArguments(RenderingArguments, StreamingImageDatasetArguments):
    cache_dir: str | None = field(default=None, metadata={"help": "Cache folder of Hub datasets."})


# Flags that only some tokenizer types read, by help group: (the types, the flags). Given to another type, a flag
# would be silently ignored, so `check_type_specific_flags` refuses it.
TYPE_SPECIFIC_FLAGS = {
    "dVAE": (("dvae",), tuple(DVAE_FLAGS.values())),
    "teacher": (("vqkd", "feature_kmeans"), ("teacher_name_or_path", "teacher_feature_layer")),
    "k-means fit": (("kmeans", "feature_kmeans"), tuple(f.name for f in dataclasses.fields(KmeansFitArguments))),
}  # fmt: skip


# The TrainingArguments that a fit reads (output folder, what to do, seed, device and launch, data workers, logging,
# progress bars, upload, --overwrite_output_dir over an earlier fit's folder) or that cannot change what it does
# (--report_to). The others set up the Trainer of the gradient-trained types, which a fit does without.
FIT_TRAINING_FLAGS = (
    "output_dir", "overwrite_output_dir", "do_train", "do_eval", "seed", "use_cpu", "local_rank", "ddp_backend",
    "ddp_timeout", "dataloader_num_workers", "log_level", "log_level_replica", "log_on_each_node", "disable_tqdm",
    "report_to", "push_to_hub", "hub_model_id", "hub_private_repo", "hub_revision", "hub_token",
)  # fmt: skip


def check_type_specific_flags(
    tokenizer_args: TokenizerArguments,
    data_args: DataArguments | None = None,
    training_args: TrainingArguments | None = None,
) -> None:
    """A one-line error for a flag set away from its default that `--tokenizer_type` does not read: a flag of another
    type, or, given to a fitted type, a training-view flag (crop, jitter, rendering; its points come from each image's
    deterministic view) or a Trainer flag outside `FIT_TRAINING_FLAGS` (learning rate, steps, precision, ...)."""
    tokenizer_type = tokenizer_args.tokenizer_type
    for types, names in TYPE_SPECIFIC_FLAGS.values():
        given = [] if tokenizer_type in types else flags_set(tokenizer_args, names)
        if given:
            raise UsageError(
                f"--{given[0]} is read by --tokenizer_type {' and '.join(types)} only; --tokenizer_type "
                f"{tokenizer_type} would ignore it: remove it or change --tokenizer_type"
            )
    if TRAINABLE[tokenizer_type].fit is None:
        return
    if data_args is not None:
        given = flags_set(data_args, [view_field.name for view_field in dataclasses.fields(RenderingArguments)])
        if given:
            raise UsageError(
                f"--{given[0]} sets the training views of gradient-trained tokenizers; --tokenizer_type "
                f"{tokenizer_type} fits on each image's deterministic view and would ignore it: remove it"
            )
    if training_args is not None:
        read = {name: getattr(training_args, name) for name in FIT_TRAINING_FLAGS if hasattr(training_args, name)}
        # The same arguments without the unread flags: the fields derived from the read ones (the DataLoader
        # defaults) are derived alike, so only the unread flags the user set differ.
        reference = type(training_args)(**read)
        given = [
            argument.name
            for argument in dataclasses.fields(training_args)
            if argument.init and getattr(training_args, argument.name) != getattr(reference, argument.name)
        ]
        # A field that defaults to None is derived from others unless given (--skip_nonfinite_steps sets
        # logging_nan_inf_filter): name the others first.
        declared = {argument.name: argument.default for argument in dataclasses.fields(training_args)}
        given.sort(key=lambda name: declared[name] is None)
        if given:
            trained = " and ".join(name for name, tokenizer in TRAINABLE.items() if tokenizer.fit is None)
            raise UsageError(
                f"--{given[0]} sets up the Trainer of --tokenizer_type {trained}; --tokenizer_type {tokenizer_type} "
                "is fitted without one and would ignore it: remove it"
            )


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
    family = TRAINABLE[tokenizer_args.tokenizer_type]
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
        values = {**saved_config.to_dict(), **parse_config_overrides(family.config_class, overrides)}
        config = config_from_flags(lambda: family.config_class.from_dict(values), f"--config_overrides {overrides!r}")
    view = family.image_processor_class.for_config(config)
    if path is None:
        return family.model_class(config), view
    if overrides:
        check_weight_shapes(family.model_class, saved_config, config, path, overrides)
    model = pretrained(family.model_class.from_pretrained, path, "tokenizer_name_or_path", config=config)
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


def train_tokenizer(
    tokenizer_args: TokenizerArguments, data_args: DataArguments, training_args: MimTrainingArguments, callbacks=None
) -> dict[str, float]:
    """Train (or fit), save and describe a tokenizer as `hf-mim train-tokenizer` does with these arguments (its flags'
    dataclasses). `callbacks` are extra `TrainerCallback`s of a gradient-trained tokenizer (fits have no Trainer).

    Returns the training metrics (and `eval_*` metrics with `--do_eval` and a validation split).
    """
    require_action(training_args)
    require_weights_to_evaluate(
        training_args, tokenizer_args.tokenizer_name_or_path, "tokenizer_name_or_path", "tokenizer", "tokenizer"
    )
    if TRAINABLE[tokenizer_args.tokenizer_type].fit is None:
        # A fit reads a stream to its end (or --kmeans_max_images): only a Trainer needs a step count.
        require_steps_when_streaming(data_args, training_args)
    check_type_specific_flags(tokenizer_args, data_args, training_args)
    setup_logging(training_args)
    family = TRAINABLE[tokenizer_args.tokenizer_type]
    if training_args.do_train:
        require_output_dir_of(training_args.output_dir, family.model_type)
        require_no_earlier_model(
            training_args,
            {name: getattr(tokenizer_args, name) for name in ("tokenizer_name_or_path", "teacher_name_or_path")},
        )
    if family.optimisation_recipe is not None:
        warn_of_transformers_optimisation_defaults(training_args, family.optimisation_recipe)
    set_seed(training_args.seed)

    model, image_processor = load_tokenizer(tokenizer_args)
    raw, image_column = load_image_datasets_from_args(
        data_args, training_args.seed, data_args.cache_dir, evaluate=training_args.do_eval
    )
    if family.fit is not None:
        dataset_tags = hub_dataset_id(data_args.dataset_name)
        fit = import_target(family.fit)
        return fit(model, image_processor, raw, image_column, tokenizer_args, training_args, dataset_tags)
    # An unset --color_jitter trains a tokenizer on unjittered views.
    data_args = data_args.with_view_defaults(color_jitter=0.0)
    skipped, eval_skipped = SkippedImageCounter(), SkippedImageCounter()
    train_transform = TwoViewTransform(image_processor, **data_args.view_options())
    # Each example's views come from its own generator (seed, epoch, index), so a resumed run redraws them.
    data_seed = None if data_args.streaming else training_args.seed
    train_dataset = apply_transform(raw["train"], image_column, train_transform, skipped=skipped, seed=data_seed)
    eval_dataset = None
    if training_args.do_eval:
        eval_transform = TwoViewTransform.for_evaluation(image_processor)
        eval_dataset = apply_transform(raw["validation"], image_column, eval_transform, skipped=eval_skipped)

    trainer = import_target(family.trainer)(
        model,
        training_args,
        tokenizer_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=MimDataCollator(),
        processing_class=image_processor,
        callbacks=callbacks,
    )

    # VQ-KD distils its teacher: another one, even at the same path, would change the targets mid-run.
    teacher = {"teacher_name_or_path": trainer.teacher.model} if hasattr(trainer, "teacher") else None
    return train_and_evaluate(
        trainer,
        training_args,
        skipped,
        eval_skipped=eval_skipped,
        dataset_name=data_args.dataset_name,
        train_dir=data_args.train_dir,
        flags=run_flags(training_args, tokenizer_args, data_args, loaded=teacher),
    )


__all__ = [
    "TRAINABLE",
    "DataArguments",
    "TokenizerArguments",
    "check_weight_shapes",
    "load_tokenizer",
    "train_tokenizer",
]
