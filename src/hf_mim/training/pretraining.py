"""Masked image modeling pre-training with a visual tokenizer, as a library: `pretrain` is `hf-mim pretrain`.

The method (`--model_type`) is an entry of `hf_mim.families.MIM_METHODS`, which supplies its config and model classes,
its data defaults and whether it replaces patches; the tokenizer is a saved one (`--tokenizer_name_or_path`) or
k-means centroids fitted on the training images first (`--fit_tokenizer`). One or many processes, CPU or GPU,
bf16/fp16, gradient accumulation and resumption come from `Trainer`.
"""

import dataclasses
import os
from dataclasses import dataclass, field

from transformers import AutoConfig, AutoImageProcessor, AutoModel, set_seed
from transformers.utils import CONFIG_NAME

from ..arguments import flags_set
from ..checkpoint_folder import (
    TOKENIZER_SUBFOLDER,
    load_tokenizer_image_processor,
    require_tokenizer_image_processor,
    save_tokenizer_image_processor,
)
from ..data import (
    MaskingArguments,
    MimDataCollator,
    RenderingArguments,
    ReplacementPositionGenerator,
    SkippedImageCounter,
    StreamingImageDatasetArguments,
    TwoViewTransform,
    apply_transform,
    build_mask_generator,
    load_image_datasets_from_args,
    scale_num_patches,
)
from ..errors import UsageError
from ..evaluation.export import check_processor_size, load_image_processor
from ..families import MIM_METHODS, MimMethod
from ..hub.callbacks import HubFilesCallback
from ..models import FeatureKmeansConfig, KmeansConfig, KmeansModel
from .arguments import (
    MimTrainingArguments,
    config_from_flags,
    parse_config_overrides,
    require_learning_rate,
    warn_of_transformers_optimisation_defaults,
)
from .kmeans import KmeansFitArguments, feature_kmeans_tokenizer, fit_tokenizer_for_mim
from .loading import pretrained, require_output_dir_of, require_tokenizer
from .trainer import MimTrainer
from .workflow import (
    check_resumption_flags,
    require_action,
    require_no_earlier_model,
    require_steps_when_streaming,
    require_weights_to_evaluate,
    resumption,
    run_flags,
    setup_logging,
    train_and_evaluate,
)


# ViT sizes of the BEiT papers (and DeiT's tiny/small).
MODEL_SIZES = {
    "tiny": {"hidden_size": 192, "num_hidden_layers": 12, "num_attention_heads": 3, "intermediate_size": 768},
    "small": {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "intermediate_size": 1536},
    "base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
    "large": {
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
        "layer_scale_init_value": 1e-5,
    },
}


@dataclass
class ModelArguments(KmeansFitArguments):
    model_type: str = field(default="beit", metadata={"help": f"MIM method: {', '.join(MIM_METHODS)}"})
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "An hf_mim MIM checkpoint (folder or Hub id) to continue pre-training from, with its "
                  "tokenizer; unset: a new ViT of --model_size"},
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={"help": "The hf_mim tokenizer (dVAE, VQ-KD, VQGAN, k-means, feature k-means; folder or Hub id) whose "
                  "tokens are the "
                  "targets; `hf-mim train-tokenizer` trains one"},
    )
    model_size: str = field(default="base", metadata={"help": f"ViT size when training from scratch: {', '.join(MODEL_SIZES)}"})
    image_size: int | None = field(
        default=None, metadata={"help": "ViT input size when training from scratch (default 224)"}
    )
    patch_size: int | None = field(
        default=None, metadata={"help": "ViT patch size when training from scratch (default 16)"}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "Config overrides when training from scratch, e.g. 'drop_path_rate=0.0,layer_scale_init_value=0.1' "
                  "(vocab_size is the tokenizer's codebook size)"},
    )
    image_processor_name: str | None = field(
        default=None,
        metadata={"help": "Image processor of the ViT's view (default: the checkpoint's, or one for the new ViT's "
                  "image size)"},
    )
    fit_tokenizer: bool = field(
        default=False,
        metadata={"help": "Fit a k-means tokenizer (CCViT's centroids of the ViT's patches) on the training images "
                  "first, into output_dir/tokenizer; instead of --tokenizer_name_or_path"},
    )
    fit_codebook_size: int = field(
        default=8192, metadata={"help": "--fit_tokenizer: number of centroids, the MIM vocabulary size (CCViT: 8192)"}
    )
    fit_teacher_name_or_path: str | None = field(
        default=None,
        metadata={"help": "--fit_tokenizer: cluster the patch features of this frozen vision model (folder or Hub id, "
                  "e.g. facebook/dinov2-base, or an hf_mim encoder) instead of raw patches (feature k-means)"},
    )
    fit_teacher_feature_layer: int | None = field(
        default=None,
        metadata={"help": "--fit_teacher_name_or_path: index into the teacher's hidden_states (default: its final "
                  "features)"},
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Cache folder of Hub models and datasets"})
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of Hub models"})
    token: str | None = field(default=None, metadata={"help": "Hub token (default: the logged-in one)"})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Let Hub models run their own code (not needed for hf_mim's models)"}
    )

    def __post_init__(self):
        for name in ("image_size", "patch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"--{name} must be a positive number of pixels, got {value}")
        if self.fit_codebook_size < 2:
            raise UsageError(f"--fit_codebook_size is the number of centroids: pass at least 2, got {self.fit_codebook_size}")
        if self.fit_teacher_feature_layer is not None and not self.fit_teacher_name_or_path:
            raise UsageError(
                "--fit_teacher_feature_layer picks a layer of --fit_teacher_name_or_path, which is not given: add the "
                "teacher or remove it"
            )
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()

@dataclass
class DataArguments(MaskingArguments, RenderingArguments, StreamingImageDatasetArguments):
    num_replaced_patches: int | None = field(
        default=None,
        metadata={"help": "Visible patches replaced by their tokenizer's reconstruction, for the methods that do so "
                  "(CCViT: its centroid; default 20 of 196, scaled)"},
    )


def mim_method(model_type: str) -> MimMethod:
    """The registered method `--model_type` names."""
    if model_type not in MIM_METHODS:
        raise UsageError(f"--model_type must be one of {list(MIM_METHODS)}, got {model_type!r}")
    return MIM_METHODS[model_type]


def build_replacement_generator(data_args: DataArguments, method: MimMethod, grid_size: int):
    """The positions a method that replaces patches replaces (`method.replaced_patches` of 196 by default, scaled to
    the grid); None for the other methods."""
    num_replaced = data_args.num_replaced_patches
    if method.replaced_patches is None:
        if num_replaced is not None:
            replacing = [name for name, other in MIM_METHODS.items() if other.replaced_patches is not None]
            raise UsageError(
                f"--num_replaced_patches is for the methods that replace patches ({', '.join(replacing)}); "
                f"--model_type {method.name} replaces no patches"
            )
        return None
    if num_replaced is None:
        num_replaced = scale_num_patches(method.replaced_patches, to_grid=grid_size * grid_size)
    return ReplacementPositionGenerator(grid_size, num_replaced)


def config_kwargs(model_args: ModelArguments) -> dict:
    """Keyword arguments of a MIM config trained from scratch: the `--model_size` preset, then `--image_size` and
    `--patch_size`, then `--config_overrides`. A flag and an override that disagree are an error, not a silent pick."""
    config_class = mim_method(model_args.model_type).config_class
    if model_args.model_size not in MODEL_SIZES:
        raise UsageError(f"--model_size must be one of {list(MODEL_SIZES)}, got {model_args.model_size!r}")
    overrides = parse_config_overrides(config_class, model_args.config_overrides)
    kwargs = dict(MODEL_SIZES[model_args.model_size])
    for name in ("image_size", "patch_size"):
        flag = getattr(model_args, name)
        if flag is None:
            continue
        if overrides.get(name, flag) != flag:
            raise UsageError(
                f"--{name} {flag} and --config_overrides {name}={overrides[name]} disagree; give the {name} once"
            )
        kwargs[name] = flag
    return {**kwargs, **overrides}


def check_vocab_size(kwargs: dict, codebook_size: int, model_args: ModelArguments) -> None:
    """The LM head predicts the tokenizer's codes, so a `vocab_size` override may only repeat the codebook size."""
    vocab_size = kwargs.get("vocab_size", codebook_size)
    if vocab_size == codebook_size:
        return
    if model_args.fit_tokenizer:
        fix = f"pass --fit_codebook_size {vocab_size} instead"
    else:
        fix = (
            f"use a tokenizer with {vocab_size} codes (scripts/train_tokenizer.py --config_overrides "
            f"codebook_size={vocab_size}, or run_mim.py --fit_tokenizer --fit_codebook_size {vocab_size} for CCViT)"
        )
    raise UsageError(
        f"--config_overrides vocab_size={vocab_size} conflicts with the tokenizer's codebook_size={codebook_size}: "
        f"the MIM vocabulary is the tokenizer's codebook. Drop vocab_size from --config_overrides, or to predict "
        f"{vocab_size} tokens {fix}"
    )


def build_config(model_args: ModelArguments, tokenizer):
    config_class = mim_method(model_args.model_type).config_class
    kwargs = config_kwargs(model_args)
    check_vocab_size(kwargs, tokenizer.codebook_size, model_args)
    image_size, patch_size = new_model_geometry(model_args)
    if image_size // patch_size != tokenizer.grid_size:
        # Every masked patch needs exactly one target token.
        grid = tokenizer.grid_size
        raise UsageError(
            f"--tokenizer_name_or_path {model_args.tokenizer_name_or_path} gives a {grid}x{grid} token grid, but the "
            f"ViT sees {image_size // patch_size}x{image_size // patch_size} patches (--image_size {image_size}, "
            f"--patch_size {patch_size}); pass --image_size {grid * patch_size}, or a tokenizer of this grid"
        )
    kwargs.update(vocab_size=tokenizer.codebook_size, tokenizer_config=tokenizer.config.to_dict())
    flags = (
        f"--model_type {model_args.model_type}, --tokenizer_name_or_path {model_args.tokenizer_name_or_path} and "
        f"--config_overrides {model_args.config_overrides!r}"
    )
    return config_from_flags(lambda: config_class(**kwargs), flags)


def load_model(model_args: ModelArguments):
    """The MIM model and the image processors of its two views."""
    model_class = mim_method(model_args.model_type).model_class
    hub_kwargs = {
        "cache_dir": model_args.cache_dir,
        "revision": model_args.model_revision,
        "token": model_args.token,
        "trust_remote_code": model_args.trust_remote_code,
    }
    if model_args.model_name_or_path:
        given = flags_set(model_args, ("config_overrides", "image_size", "patch_size", "model_size"))
        if given:
            raise UsageError(
                f"{', '.join('--' + name for name in given)} describe a model trained from scratch, but "
                f"--model_name_or_path continues {model_args.model_name_or_path}, whose config is fixed; drop them"
            )
        if model_args.tokenizer_name_or_path:
            raise UsageError(
                f"--model_name_or_path {model_args.model_name_or_path} continues a checkpoint with its own tokenizer; "
                "drop --tokenizer_name_or_path (a new tokenizer needs a new model: drop --model_name_or_path)"
            )
        check_checkpoint_method(model_args, hub_kwargs)
        model = pretrained(model_class.from_pretrained, model_args.model_name_or_path, "model_name_or_path", **hub_kwargs)
        if model.config.tokenizer_config is None:
            raise UsageError(
                f"--model_name_or_path {model_args.model_name_or_path} holds no tokenizer to compute its targets (a "
                "released checkpoint converted without one?): convert it again with --tokenizer_name_or_path"
            )
        # Checkpoints of older hf_mim runs (checkpoint-<step>) were saved without the view.
        require_tokenizer_image_processor(
            model_args.model_name_or_path, "model_name_or_path",
            "to continue that run pass it as --resume_from_checkpoint, or pass the run's --output_dir, which has it",
        )  # fmt: skip
        tokenizer_processor = load_tokenizer_image_processor(model_args.model_name_or_path, **hub_kwargs)
        image_processor = vit_image_processor(model_args, model.config, hub_kwargs)
        return model, image_processor, tokenizer_processor

    if not model_args.tokenizer_name_or_path:
        raise UsageError(
            f"--model_type {model_args.model_type} needs --tokenizer_name_or_path (an hf_mim tokenizer; train one "
            "with scripts/train_tokenizer.py) or --model_name_or_path (a checkpoint that holds its tokenizer)"
        )
    tokenizer = pretrained(AutoModel.from_pretrained, model_args.tokenizer_name_or_path, "tokenizer_name_or_path", **hub_kwargs)
    require_tokenizer(tokenizer, model_args.tokenizer_name_or_path)
    tokenizer_processor = pretrained(
        AutoImageProcessor.from_pretrained, model_args.tokenizer_name_or_path, "tokenizer_name_or_path", **hub_kwargs
    )
    config = build_config(model_args, tokenizer)
    model = model_class(config)
    model.set_tokenizer(tokenizer)
    return model, vit_image_processor(model_args, config, hub_kwargs), tokenizer_processor


def check_checkpoint_method(model_args: ModelArguments, hub_kwargs: dict) -> None:
    """A one-line error when `--model_name_or_path` is not a MIM checkpoint of `--model_type`: loading it as one would
    keep only the weights both share and train the rest from scratch, with nothing but a warning."""
    expected = mim_method(model_args.model_type).config_class.model_type
    config = pretrained(AutoConfig.from_pretrained, model_args.model_name_or_path, "model_name_or_path", **hub_kwargs)
    if config.model_type == expected:
        return
    methods = {method.config_class.model_type: name for name, method in MIM_METHODS.items()}
    if config.model_type in methods:
        fix = f"pass --model_type {methods[config.model_type]} to continue it"
    else:
        fix = "pass an hf_mim MIM checkpoint (a tokenizer goes to --tokenizer_name_or_path of a new model)"
    raise UsageError(
        f"--model_name_or_path {model_args.model_name_or_path} is a {config.model_type} checkpoint, not one of "
        f"--model_type {model_args.model_type} ({expected}); {fix}"
    )


def vit_image_processor(model_args: ModelArguments, config, hub_kwargs: dict):
    """The ViT view's processor: `--image_processor_name`'s, else the checkpoint's, else one for a new model's size;
    a one-line error when it does not load or does not produce the model's input size."""
    if model_args.image_processor_name is None and model_args.model_name_or_path is None:
        return mim_method(model_args.model_type).image_processor_class.for_config(config)
    processor = load_image_processor(model_args.model_name_or_path, model_args.image_processor_name, **hub_kwargs)
    check_processor_size(processor, config.image_size, model_args.model_name_or_path, model_args.image_processor_name)
    return processor


def new_model_geometry(model_args: ModelArguments) -> tuple[int, int]:
    """The image and patch size of the model the flags describe, trained from scratch; a one-line error when the
    patches do not tile the image."""
    kwargs, defaults = config_kwargs(model_args), mim_method(model_args.model_type).config_class()
    image_size, patch_size = kwargs.get("image_size", defaults.image_size), kwargs.get("patch_size", defaults.patch_size)
    if isinstance(image_size, int) and isinstance(patch_size, int) and 0 < patch_size <= image_size and image_size % patch_size:
        raise UsageError(
            f"--image_size {image_size} is not a multiple of --patch_size {patch_size} (the patches must tile the image): "
            f"pass e.g. --image_size {image_size - image_size % patch_size}"
        )
    return image_size, patch_size


def build_collator(data_args: DataArguments, method: MimMethod, grid_size: int) -> MimDataCollator:
    """The batches of `method` on a `grid_size` x `grid_size` patch grid: masks, and the replaced positions of a
    method that replaces patches; masking flags that cannot go together end in one line."""
    try:
        return MimDataCollator(
            build_mask_generator(data_args, grid_size),
            replacement_generator=build_replacement_generator(data_args, method, grid_size),
        )
    except ValueError as error:
        if isinstance(error, UsageError):
            raise
        raise UsageError(str(error)) from error


def fit_tokenizer(model_args: ModelArguments, dataset, image_column: str, training_args: MimTrainingArguments) -> str:
    """`--fit_tokenizer`: `--fit_codebook_size` k-means centroids of the ViT's own patches (its image and patch size),
    of their pixels or, with `--fit_teacher_name_or_path`, of that teacher's features of them (feature k-means),
    fitted on `dataset` by every process and saved in `output_dir/tokenizer`; returns that folder."""
    if model_args.tokenizer_name_or_path or model_args.model_name_or_path:
        raise UsageError(
            "--fit_tokenizer fits a new tokenizer for a model trained from scratch; drop it, or drop "
            "--tokenizer_name_or_path / --model_name_or_path"
        )
    method = mim_method(model_args.model_type)
    if model_args.fit_teacher_name_or_path and method.replaced_patches is not None:
        raise UsageError(
            f"--fit_teacher_name_or_path fits feature k-means, whose centroids are teacher features, but {method.title} "
            "replaces patches by their pixel centroids; drop the flag, or use another --model_type"
        )
    # Checked before the fit, which can take hours, rather than when the model is built after it.
    check_vocab_size(config_kwargs(model_args), model_args.fit_codebook_size, model_args)
    image_size, patch_size = new_model_geometry(model_args)
    view = {"image_size": image_size, "patch_size": patch_size, "codebook_size": model_args.fit_codebook_size}
    config_class = FeatureKmeansConfig if model_args.fit_teacher_name_or_path else KmeansConfig
    config = config_from_flags(lambda: config_class(**view), "--image_size, --patch_size and --fit_codebook_size")
    if model_args.fit_teacher_name_or_path:
        tokenizer = feature_kmeans_tokenizer(
            config, model_args.fit_teacher_name_or_path, model_args.fit_teacher_feature_layer,
            flag="fit_teacher_name_or_path",
        )  # fmt: skip
    else:
        tokenizer = KmeansModel(config)
    return fit_tokenizer_for_mim(
        dataset,
        image_column,
        tokenizer,
        model_args,
        fitted_tokenizer_folder(training_args),
        seed=training_args.seed,
        device=training_args.device,
        num_workers=training_args.dataloader_num_workers,
        refit=training_args.overwrite_output_dir,
    )


def fitted_tokenizer_folder(training_args: MimTrainingArguments) -> str:
    """Where `--fit_tokenizer` saves, or finds, the run's tokenizer: `output_dir/tokenizer`, unless the run resumes
    from a checkpoint of another folder whose run fitted one there (a new fit, hours at CCViT's scale, would have to
    give the very centroids the checkpoint was trained with, or be refused)."""
    folder = os.path.join(training_args.output_dir, TOKENIZER_SUBFOLDER)
    resumed = resumption(training_args) if training_args.do_train else None
    if resumed is None or training_args.overwrite_output_dir or os.path.isfile(os.path.join(folder, CONFIG_NAME)):
        return folder
    fitted = os.path.join(os.path.dirname(os.path.normpath(resumed[0])), TOKENIZER_SUBFOLDER)
    return fitted if os.path.isfile(os.path.join(fitted, CONFIG_NAME)) else folder


# The flags only `--fit_tokenizer` reads: without it they would be silently ignored.
FIT_TOKENIZER_FLAGS = (
    "fit_codebook_size",
    "fit_teacher_name_or_path",
    "fit_teacher_feature_layer",
    *(f.name for f in dataclasses.fields(KmeansFitArguments)),
)


def check_fit_flags(model_args: ModelArguments) -> None:
    """A one-line error for a `--fit_tokenizer` flag set away from its default without `--fit_tokenizer`."""
    given = [] if model_args.fit_tokenizer else flags_set(model_args, FIT_TOKENIZER_FLAGS)
    if given:
        raise UsageError(f"--{given[0]} is a flag of --fit_tokenizer, which is not given: add --fit_tokenizer or remove it")


def pretrain(
    model_args: ModelArguments, data_args: DataArguments, training_args: MimTrainingArguments, callbacks=None
) -> dict[str, float]:
    """Pre-train as `hf-mim pretrain` does with these arguments (its flags' dataclasses); `callbacks` are extra
    `TrainerCallback`s (e.g. for custom logging). Writes the checkpoint (with its tokenizer and the tokenizer view's
    image processor), metrics and model card to `output_dir`; returns the train and eval metrics."""
    require_action(training_args)
    require_learning_rate(training_args, "the model")
    require_steps_when_streaming(data_args, training_args)
    check_fit_flags(model_args)
    method = mim_method(model_args.model_type)
    if training_args.do_train:
        require_output_dir_of(training_args.output_dir, method.model_type)
        require_no_earlier_model(
            training_args,
            {name: getattr(model_args, name) for name in
             ("model_name_or_path", "tokenizer_name_or_path", "image_processor_name", "fit_teacher_name_or_path")},
            " (and to fit its tokenizer again)" if model_args.fit_tokenizer else "",
        )  # fmt: skip
    require_weights_to_evaluate(training_args, model_args.model_name_or_path, "model_name_or_path", "checkpoint", "model")
    data_args.check_masking_flags(method.data_defaults.get("masking", "blockwise"))
    data_args = method.with_data_defaults(data_args).with_view_defaults()
    setup_logging(training_args)
    warn_of_transformers_optimisation_defaults(training_args, method.optimisation_recipe)
    set_seed(training_args.seed)

    raw, image_column = load_image_datasets_from_args(
        data_args, training_args.seed, model_args.cache_dir, model_args.token, evaluate=training_args.do_eval
    )

    if model_args.fit_tokenizer:
        # The masking flags, and those of a checkpoint to resume, are checked before the fit, which can take hours.
        image_size, patch_size = new_model_geometry(model_args)
        data_args = data_args.with_grid_defaults(image_size // patch_size)
        build_collator(data_args, method, image_size // patch_size)
        if training_args.do_train:
            check_resumption_flags(training_args, run_flags(training_args, model_args, data_args))
        model_args.tokenizer_name_or_path = fit_tokenizer(model_args, raw["train"], image_column, training_args)
    model, image_processor, tokenizer_processor = load_model(model_args)
    grid_size = model.config.image_size // model.config.patch_size
    data_args = data_args.with_grid_defaults(grid_size)
    skipped, eval_skipped = SkippedImageCounter(), SkippedImageCounter()
    # A method that replaces patches (CCViT) reads the tokenizer's view and normalises it itself after replacement; the
    # saved image processor is its encoder's view for downstream use.
    raw_view = method.reads_tokenizer_view
    view_kwargs = {
        "image_processor": tokenizer_processor if raw_view else image_processor,
        "tokenizer_image_processor": None if raw_view else tokenizer_processor,
        **data_args.view_options(),
    }
    train_dataset = eval_dataset = None
    # Per-example generators keyed by (seed, epoch, index) make a resumed run redraw the crops and masks of an
    # uninterrupted one (torch's RNG, saved in checkpoints, is a batch ahead because of DataLoader prefetching).
    data_seed = None if data_args.streaming else training_args.seed
    if training_args.do_train:
        train_dataset = apply_transform(raw["train"], image_column, TwoViewTransform(**view_kwargs), skipped, seed=data_seed)
    if training_args.do_eval:
        eval_transform = TwoViewTransform.for_evaluation(
            view_kwargs["image_processor"], view_kwargs["tokenizer_image_processor"]
        )
        eval_dataset = apply_transform(raw["validation"], image_column, eval_transform, eval_skipped, seed=data_seed)

    trainer = MimTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=build_collator(data_args, method, grid_size),
        processing_class=image_processor,
        callbacks=[HubFilesCallback(subfolders={TOKENIZER_SUBFOLDER: tokenizer_processor}), *(callbacks or [])],
        skip_nonfinite_steps=training_args.skip_nonfinite_steps,
    )

    def save_tokenizer_view(checkpoint: str) -> None:
        # Every checkpoint is a MIM checkpoint like the final model: continued, visualised or pushed, it needs the view.
        if training_args.should_save:
            save_tokenizer_image_processor(checkpoint, tokenizer_processor)

    trainer.checkpoint_writers.append(save_tokenizer_view)
    return train_and_evaluate(
        trainer,
        training_args,
        skipped,
        eval_skipped=eval_skipped,
        after_save=lambda: save_tokenizer_image_processor(training_args.output_dir, tokenizer_processor),
        dataset_name=data_args.dataset_name,
        train_dir=data_args.train_dir,
        flags=run_flags(training_args, model_args, data_args, loaded={"image_processor_name": image_processor}),
    )


__all__ = [
    "MODEL_SIZES",
    "DataArguments",
    "ModelArguments",
    "build_collator",
    "build_config",
    "build_replacement_generator",
    "config_kwargs",
    "fit_tokenizer",
    "load_model",
    "mim_method",
    "new_model_geometry",
    "pretrain",
]
