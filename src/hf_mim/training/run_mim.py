"""Masked image modeling pre-training with a visual tokenizer: `accelerate launch scripts/run_mim.py ...`.

Flags follow transformers' `run_mim.py` (data and model arguments plus every `TrainingArguments`
flag), with BEiT's masking and tokenizer flags. One or many processes, CPU or GPU, bf16/fp16,
gradient accumulation and `--resume_from_checkpoint` come from `Trainer`.
"""

import dataclasses
import logging
import os
import sys
from dataclasses import dataclass, field

import datasets
import torch
import transformers
from safetensors import safe_open
from transformers import AutoImageProcessor, AutoModel, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from ..arguments import command_parser
from ..data import (
    BlockwiseMaskingGenerator,
    MimDataCollator,
    RandomMaskingGenerator,
    ReplacementPositionGenerator,
    SkippedImageCounter,
    StreamingImageDatasetArguments,
    TwoViewTransform,
    apply_transform,
    load_image_datasets_from_args,
    scale_num_patches,
)
from ..errors import UsageError
from ..hub.callbacks import HubFilesCallback
from ..hub.cards import describe_training_data, hub_dataset_id
from ..models import (
    BeitMimConfig,
    BeitMimForMaskedImageModeling,
    Beitv2Config,
    Beitv2ForMaskedImageModeling,
    CcvitConfig,
    CcvitForMaskedImageModeling,
    KmeansConfig,
    McBeitConfig,
    McBeitForMaskedImageModeling,
    MimImageProcessor,
)
from .arguments import HfMimTrainingArguments
from .kmeans import KmeansFitArguments, fit_tokenizer_for_mim
from .loading import pretrained, require_tokenizer
from .trainer import MimTrainer

logger = logging.getLogger(__name__)

# --model_type -> (config class, model class); each method adds its entry.
MIM_MODELS = {
    "beit": (BeitMimConfig, BeitMimForMaskedImageModeling),
    "beitv2": (Beitv2Config, Beitv2ForMaskedImageModeling),
    "mcbeit": (McBeitConfig, McBeitForMaskedImageModeling),
    "ccvit": (CcvitConfig, CcvitForMaskedImageModeling),
}

# Data flags whose default depends on the method: a flag left unset takes its --model_type's value here, else BEiT's.
DATA_DEFAULTS = {
    "beit": {"masking": "blockwise", "mask_ratio": 0.4, "color_jitter": 0.4},
    # mc-BEiT's published recipe: 75% of the patches masked uniformly at random (147 of 196), no colour jitter.
    "mcbeit": {"masking": "random", "mask_ratio": 0.75, "color_jitter": 0.0},
    # CCViT: BEiT's blockwise 75 of 196, no colour jitter (its centroids are fitted on un-jittered pixels).
    "ccvit": {"masking": "blockwise", "color_jitter": 0.0},
}

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

# Where a MIM checkpoint written by this script keeps its tokenizer's image processor.
TOKENIZER_SUBFOLDER = "tokenizer"


@dataclass
class ModelArguments(KmeansFitArguments):
    model_type: str = field(default="beit", metadata={"help": f"MIM method: {', '.join(MIM_MODELS)}"})
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "An hf_mim MIM checkpoint (folder or Hub id) to continue pre-training from, with its "
                  "tokenizer; unset: a new ViT of --model_size"},
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={"help": "The hf_mim tokenizer (dVAE, VQ-KD, VQGAN, k-means; folder or Hub id) whose tokens are the "
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
    cache_dir: str | None = field(default=None, metadata={"help": "Cache folder of Hub models and datasets"})
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of Hub models"})
    token: str | None = field(default=None, metadata={"help": "Hub token (default: the logged-in one)"})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Let Hub models run their own code (not needed for hf_mim's models)"}
    )


@dataclass
class DataArguments(StreamingImageDatasetArguments):
    crop_min_scale: float = field(
        default=0.08,
        metadata={"help": "Random-resized-crop minimum area, a fraction of the image (BEiT v2 recipe: 0.2)"},
    )
    color_jitter: float | None = field(
        default=None, metadata={"help": "Colour jitter strength (default 0.4; mcbeit, ccvit: 0)"}
    )
    masking: str | None = field(
        default=None, metadata={"help": "blockwise (BEiT's blocks) or random (default blockwise; mcbeit: random)"}
    )
    num_mask_patches: int | None = field(
        default=None,
        metadata={"help": "Patches masked per image by blockwise masking (default 75 of 196, scaled to the patch "
                  "grid)"},
    )
    min_mask_patches_per_block: int | None = field(
        default=None, metadata={"help": "Smallest masked block (default 16 of 196, scaled)"}
    )
    max_mask_patches_per_block: int | None = field(
        default=None, metadata={"help": "Largest masked block (default: --num_mask_patches)"}
    )
    exact_mask_count: bool = field(
        default=True, metadata={"help": "Mask exactly --num_mask_patches (BEiT v2); false: at most (BEiT v1)"}
    )
    num_replaced_patches: int | None = field(
        default=None, metadata={"help": "CCViT: visible patches replaced by their centroid (default 20 of 196, scaled)"}
    )
    mask_ratio: float | None = field(
        default=None, metadata={"help": "Masked fraction of --masking random (default 0.4; mcbeit: 0.75)"}
    )


@dataclass
class MimTrainingArguments(HfMimTrainingArguments):
    # MIM batches carry more than `labels`, and eval logits (masked tokens x vocabulary) are not needed for metrics.
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Drop the dataset columns that the model's forward does not take (off: the image column "
                  "is transformed when read)"},
    )
    prediction_loss_only: bool = field(
        default=True,
        metadata={"help": "Evaluate the loss only, without gathering the logits (masked tokens x vocabulary)"},
    )
    # Targets come from the tokenizer inside the model: with no label names, evaluation still computes the loss.
    label_names: list[str] = field(
        default_factory=list,
        metadata={"help": "The batch keys that hold labels (none: the targets come from the tokenizer inside the "
                  "model)"},
    )


def resolve_data_defaults(data_args: DataArguments, model_type: str = "beit") -> DataArguments:
    """A copy of `data_args` whose unset method-dependent flags hold `model_type`'s defaults (`DATA_DEFAULTS`)."""
    defaults = {**DATA_DEFAULTS["beit"], **DATA_DEFAULTS.get(model_type, {})}
    unset = {name: value for name, value in defaults.items() if getattr(data_args, name) is None}
    return dataclasses.replace(data_args, **unset)


def build_mask_generator(data_args: DataArguments, grid_size: int):
    """The mask generator the flags describe; flags still unset take BEiT's defaults."""
    data_args = resolve_data_defaults(data_args)
    num_patches = grid_size * grid_size
    if data_args.masking == "random":
        return RandomMaskingGenerator(grid_size, mask_ratio=data_args.mask_ratio)
    if data_args.masking != "blockwise":
        raise UsageError(f"--masking must be 'blockwise' or 'random', got {data_args.masking!r}")
    num_mask = data_args.num_mask_patches or scale_num_patches(75, to_grid=num_patches)
    min_block = data_args.min_mask_patches_per_block or min(num_mask, scale_num_patches(16, to_grid=num_patches))
    return BlockwiseMaskingGenerator(
        grid_size,
        num_masking_patches=num_mask,
        min_num_patches=min_block,
        max_num_patches=data_args.max_mask_patches_per_block,
        exact=data_args.exact_mask_count,
    )


def build_replacement_generator(data_args: DataArguments, model_type: str, grid_size: int):
    """CCViT's centroid replacement positions (20 of 196 by default, scaled to the grid); None for other methods."""
    if model_type != "ccvit":
        if data_args.num_replaced_patches is not None:
            raise UsageError(f"--num_replaced_patches is CCViT's; --model_type {model_type} replaces no patches")
        return None
    num_patches = grid_size * grid_size
    num_replaced = data_args.num_replaced_patches
    return ReplacementPositionGenerator(grid_size, scale_num_patches(20, to_grid=num_patches) if num_replaced is None else num_replaced)


def parse_config_overrides(config_class, overrides: str | None) -> dict:
    """`'a=1,b=x'` as typed keyword arguments, using the types of the config's defaults: `--config_overrides` of
    every script (MIM models and tokenizers alike)."""
    if not overrides:
        return {}
    items = [item.split("=", 1) for item in overrides.split(",")]
    malformed = [item[0] for item in items if len(item) != 2 or not item[0].strip()]
    if malformed:
        raise UsageError(
            f"--config_overrides takes comma-separated name=value pairs, got {malformed[0]!r} in {overrides!r}"
        )
    names = [name.strip() for name, _ in items]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        # Picking one of the values would silently drop the other.
        raise UsageError(
            f"--config_overrides sets {', '.join(repeated)} more than once in {overrides!r}; give each name once"
        )
    probe = config_class()
    if "tokenizer_config" in names and hasattr(probe, "tokenizer_config"):
        raise UsageError(
            "--config_overrides cannot set tokenizer_config: it is the config of the tokenizer that supplies the "
            "targets; pass that tokenizer with --tokenizer_name_or_path"
        )
    probe.update_from_string(",".join(f"{name}={value}" for name, (_, value) in zip(names, items)))
    return {name: getattr(probe, name) for name in names}


def config_kwargs(model_args: ModelArguments) -> dict:
    """Keyword arguments of a MIM config trained from scratch: the `--model_size` preset, then `--image_size` and
    `--patch_size`, then `--config_overrides`. A flag and an override that disagree are an error, not a silent pick."""
    config_class, _ = MIM_MODELS[model_args.model_type]
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
    config_class, _ = MIM_MODELS[model_args.model_type]
    kwargs = config_kwargs(model_args)
    check_vocab_size(kwargs, tokenizer.codebook_size, model_args)
    kwargs.update(vocab_size=tokenizer.codebook_size, tokenizer_config=tokenizer.config.to_dict())
    return config_class(**kwargs)


def load_model(model_args: ModelArguments):
    """The MIM model and the image processors of its two views."""
    if model_args.model_type not in MIM_MODELS:
        raise UsageError(f"--model_type must be one of {list(MIM_MODELS)}, got {model_args.model_type!r}")
    _, model_class = MIM_MODELS[model_args.model_type]
    hub_kwargs = {
        "cache_dir": model_args.cache_dir,
        "revision": model_args.model_revision,
        "token": model_args.token,
        "trust_remote_code": model_args.trust_remote_code,
    }
    if model_args.model_name_or_path:
        architecture_flags = [
            f"--{name}" for name in ("config_overrides", "image_size", "patch_size") if getattr(model_args, name)
        ]
        if architecture_flags:
            raise UsageError(
                f"{', '.join(architecture_flags)} describe a model trained from scratch, but --model_name_or_path "
                f"continues {model_args.model_name_or_path}, whose config is fixed; drop them"
            )
        model = pretrained(model_class.from_pretrained, model_args.model_name_or_path, "model_name_or_path", **hub_kwargs)
        tokenizer_source = model_args.tokenizer_name_or_path or os.path.join(model_args.model_name_or_path, TOKENIZER_SUBFOLDER)
        tokenizer_processor = AutoImageProcessor.from_pretrained(tokenizer_source, **hub_kwargs)
        image_processor = AutoImageProcessor.from_pretrained(
            model_args.image_processor_name or model_args.model_name_or_path, **hub_kwargs
        )
        return model, image_processor, tokenizer_processor

    if not model_args.tokenizer_name_or_path:
        raise UsageError(
            f"--model_type {model_args.model_type} needs --tokenizer_name_or_path (an hf_mim tokenizer; train one "
            "with scripts/train_tokenizer.py) or --model_name_or_path (a checkpoint that holds its tokenizer)"
        )
    tokenizer = pretrained(AutoModel.from_pretrained, model_args.tokenizer_name_or_path, "tokenizer_name_or_path", **hub_kwargs)
    require_tokenizer(tokenizer, model_args.tokenizer_name_or_path)
    tokenizer_processor = AutoImageProcessor.from_pretrained(model_args.tokenizer_name_or_path, **hub_kwargs)
    config = build_config(model_args, tokenizer)
    model = model_class(config)
    model.set_tokenizer(tokenizer)
    if model_args.image_processor_name:
        image_processor = AutoImageProcessor.from_pretrained(model_args.image_processor_name, **hub_kwargs)
    else:
        side = config.image_size
        image_processor = MimImageProcessor(size={"height": side, "width": side}, crop_size={"height": side, "width": side})
    return model, image_processor, tokenizer_processor


def fit_tokenizer(model_args: ModelArguments, dataset, image_column: str, training_args: MimTrainingArguments) -> str:
    """`--fit_tokenizer`: `--fit_codebook_size` k-means centroids of the ViT's own patches (its image and patch size),
    fitted on `dataset` by every process and saved in `output_dir/tokenizer`; returns that folder."""
    if model_args.tokenizer_name_or_path or model_args.model_name_or_path:
        raise UsageError(
            "--fit_tokenizer fits a new tokenizer for a model trained from scratch; drop it, or drop "
            "--tokenizer_name_or_path / --model_name_or_path"
        )
    if model_args.model_type not in MIM_MODELS:
        raise UsageError(f"--model_type must be one of {list(MIM_MODELS)}, got {model_args.model_type!r}")
    config_class, _ = MIM_MODELS[model_args.model_type]
    kwargs = config_kwargs(model_args)
    # Checked before the fit, which can take hours, rather than when the model is built after it.
    check_vocab_size(kwargs, model_args.fit_codebook_size, model_args)
    defaults = config_class()
    config = KmeansConfig(
        image_size=kwargs.get("image_size", defaults.image_size),
        patch_size=kwargs.get("patch_size", defaults.patch_size),
        codebook_size=model_args.fit_codebook_size,
    )
    return fit_tokenizer_for_mim(
        dataset,
        image_column,
        config,
        model_args,
        os.path.join(training_args.output_dir, TOKENIZER_SUBFOLDER),
        seed=training_args.seed,
        device=training_args.device,
        num_workers=training_args.dataloader_num_workers,
        refit=training_args.overwrite_output_dir,
    )


def parse_args(argv=None):
    parser = command_parser(
        (ModelArguments, DataArguments, MimTrainingArguments),
        description="""
        Masked image modeling pre-training (BEiT, BEiT v2, mc-BEiT, CCViT) with the transformers Trainer: a ViT
        learns to predict, for each masked patch, the token that a visual tokenizer gives it. The tokenizer is a
        saved one (--tokenizer_name_or_path; `hf-mim train-tokenizer` trains one, `hf-mim convert-*` converts a
        released one) or k-means centroids fitted on the training images first (--fit_tokenizer, CCViT). Masking and
        augmentation defaults follow --model_type. One or many processes, CPU or GPU, bf16/fp16, gradient
        accumulation and resumption come from Trainer (its options are listed last). --output_dir receives the
        checkpoint (which holds its tokenizer) and a model card.

        examples:
          # BEiT (ViT-Tiny) on a folder of images, with a dVAE tokenizer
          hf-mim pretrain --model_type beit --tokenizer_name_or_path ./my-dvae --train_dir ./images \\
              --output_dir ./beit --do_train --model_size tiny --max_steps 1000

          # CCViT: fit 8192 k-means centroids of the training images' patches, then pre-train with them
          hf-mim pretrain --model_type ccvit --fit_tokenizer --kmeans_max_images 50000 --train_dir ./images \\
              --output_dir ./ccvit --do_train --num_train_epochs 300 --bf16

          # 8 GPUs of one machine (on a CPU machine: --use_cpu instead of --bf16)
          accelerate launch --multi_gpu --num_processes 8 -m hf_mim pretrain ... --bf16
        """,
        groups=[
            ("model", [ModelArguments]),
            ("tokenizer", ["tokenizer_name_or_path", "fit_tokenizer", "fit_codebook_size"]),
            ("k-means fit (--fit_tokenizer)", [KmeansFitArguments]),
            ("data", [StreamingImageDatasetArguments]),
            ("augmentation", ["crop_min_scale", "color_jitter"]),
            ("masking", [DataArguments]),
        ],
        json_file=True,
    )
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    return parser.parse_args_into_dataclasses(args=argv)


def setup_logging(training_args: TrainingArguments) -> None:
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    logging.getLogger("hf_mim").setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)


def require_action(training_args: TrainingArguments) -> None:
    """Fail instead of exiting successfully without doing anything (transformers' flags default to off)."""
    if not (training_args.do_train or training_args.do_eval):
        raise UsageError("Nothing to do: pass --do_train (and/or --do_eval)")


def find_checkpoint(training_args: MimTrainingArguments) -> str | None:
    """The checkpoint to resume from: the one given, else the last in output_dir unless --overwrite_output_dir.

    Says which one (a warning: resuming changes what the run does), warns when it lacks the optimiser or scheduler
    state (they would start afresh), and names an unreadable weights file with the fix.
    """
    given = training_args.resume_from_checkpoint
    if given is not None:
        if not os.path.isdir(given):
            raise UsageError(f"--resume_from_checkpoint {given}: no such folder; pass a checkpoint-<step> folder")
        checkpoint = given
        fix = "pass another checkpoint to --resume_from_checkpoint"
    else:
        if not os.path.isdir(training_args.output_dir) or training_args.overwrite_output_dir or not training_args.do_train:
            return None
        checkpoint = get_last_checkpoint(training_args.output_dir)
        if checkpoint is None:
            return None
        fix = "pass --overwrite_output_dir to start afresh, or --resume_from_checkpoint with an earlier checkpoint"
    check_checkpoint_weights(checkpoint, fix)
    missing = [name for name in ("optimizer.pt", "scheduler.pt") if not os.path.isfile(os.path.join(checkpoint, name))]
    if missing:
        logger.warning(f"{checkpoint} has no {' or '.join(missing)}: that state starts afresh")
    how = "" if given is not None else " (the last checkpoint in --output_dir; --overwrite_output_dir starts afresh)"
    logger.warning(f"Resuming training from {checkpoint}{how}")
    return checkpoint


def check_checkpoint_weights(checkpoint: str, fix: str) -> None:
    """A one-line error naming the file when a checkpoint's safetensors weights are missing or unreadable."""
    files = [os.path.join(checkpoint, name) for name in sorted(os.listdir(checkpoint)) if name.endswith(".safetensors")]
    if not files:
        raise UsageError(f"{checkpoint} holds no *.safetensors weights: {fix}")
    for path in files:
        try:
            with safe_open(path, framework="pt") as weights:
                weights.keys()
        except Exception as error:  # safetensors raises its own error types for truncated or corrupt files
            raise UsageError(f"{path} is unreadable ({error}): {fix}") from error


def require_decoded_images(trainer, skipped) -> int:
    """The undecodable images skipped in training, over all processes and their DataLoader workers; a run that
    decoded no image, or fewer than it skipped, trained on next to nothing and fails instead of saving a model."""
    counts = torch.tensor([float(skipped.value), float(trainer.throughput.samples)], device=trainer.args.device)
    if trainer.accelerator.num_processes > 1:
        counts = trainer.accelerator.reduce(counts, reduction="sum")
    undecodable, decoded = (int(value) for value in counts.tolist())
    # A resumed run that had nothing left to do ran no step: nothing to judge.
    if trainer.throughput.steps and (decoded == 0 or undecodable > decoded):
        raise UsageError(
            f"{undecodable} training images could not be decoded and {decoded} could (see the warnings above for "
            "the files); no model was saved: point --train_dir at your images, or fix or remove the broken files"
        )
    return undecodable


def train_and_evaluate(
    trainer,
    training_args: TrainingArguments,
    skipped,
    after_save=None,
    dataset_name: str | None = None,
    model_card: bool = True,
    train_dir: str | None = None,
) -> dict[str, float]:
    """The end of every hf_mim training script: train (resuming if asked), save, evaluate, write the card.

    `after_save` runs on the main process after the model is saved (e.g. to add the tokenizer's processor);
    `skipped` is the `SkippedImageCounter` of the datasets; `model_card=False` for outputs that are not hf_mim
    families (a stock transformers classifier), which get no hf_mim card; the card names `dataset_name` when it is
    a Hub dataset, else the `train_dir` folder and its image count. Returns train and eval metrics.
    """
    metrics: dict[str, float] = {}
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=find_checkpoint(training_args))
        undecodable = require_decoded_images(trainer, skipped)
        trainer.save_model()
        if after_save is not None and trainer.is_world_process_zero():
            after_save()
        result.metrics["train_skipped_images"] = undecodable
        result.metrics["train_skipped_nonfinite_steps"] = trainer.nonfinite_guard.skipped_steps
        metrics.update(result.metrics)
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
    if training_args.do_eval:
        eval_metrics = trainer.evaluate()
        metrics.update(eval_metrics)
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
    if training_args.do_train and model_card:
        # hf_mim's card (MimTrainer.create_model_card), pushed with everything else under --push_to_hub.
        card = {"dataset_tags": hub_dataset_id(dataset_name)}
        num_images = len(trainer.train_dataset) if hasattr(trainer.train_dataset, "__len__") else None
        trainer.training_data = describe_training_data(train_dir, num_images)
        if training_args.push_to_hub:
            trainer.push_to_hub(**card)
        else:
            trainer.create_model_card(**card)
    if skipped.value:
        logger.warning(f"{skipped.value} undecodable images were skipped (see the warnings above for the files)")
    return metrics


def main(argv=None, callbacks=None) -> dict[str, float]:
    """Run pre-training from command-line arguments (`argv`, default `sys.argv[1:]`); `callbacks` are extra
    `TrainerCallback`s (e.g. for custom logging). Returns the train and eval metrics."""
    model_args, data_args, training_args = parse_args(argv)
    require_action(training_args)
    data_args = resolve_data_defaults(data_args, model_args.model_type)
    setup_logging(training_args)
    set_seed(training_args.seed)

    raw, image_column = load_image_datasets_from_args(
        data_args, training_args.seed, model_args.cache_dir, model_args.token, require_validation=training_args.do_eval
    )

    if model_args.fit_tokenizer:
        model_args.tokenizer_name_or_path = fit_tokenizer(model_args, raw["train"], image_column, training_args)
    model, image_processor, tokenizer_processor = load_model(model_args)
    grid_size = model.config.image_size // model.config.patch_size
    skipped = SkippedImageCounter()
    # CCViT reads the raw [0, 1] tokenizer view and normalises after centroid replacement; the saved (normalising)
    # image processor is its encoder's view for downstream use.
    raw_view = model_args.model_type == "ccvit"
    view_kwargs = {
        "image_processor": tokenizer_processor if raw_view else image_processor,
        "tokenizer_image_processor": None if raw_view else tokenizer_processor,
        "crop_scale": (data_args.crop_min_scale, 1.0),
        "color_jitter": data_args.color_jitter,
    }
    train_dataset = eval_dataset = None
    # Per-example generators keyed by (seed, epoch, index) make a resumed run redraw the crops and masks of an
    # uninterrupted one (torch's RNG, saved in checkpoints, is a batch ahead because of DataLoader prefetching).
    data_seed = None if data_args.streaming else training_args.seed
    if training_args.do_train:
        train_dataset = apply_transform(raw["train"], image_column, TwoViewTransform(**view_kwargs), skipped, seed=data_seed)
    if training_args.do_eval:
        eval_dataset = apply_transform(
            raw["validation"], image_column, TwoViewTransform(**view_kwargs, train=False), skipped, seed=data_seed
        )

    trainer = MimTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=MimDataCollator(
            build_mask_generator(data_args, grid_size),
            replacement_generator=build_replacement_generator(data_args, model_args.model_type, grid_size),
        ),
        processing_class=image_processor,
        callbacks=[HubFilesCallback(subfolders={TOKENIZER_SUBFOLDER: tokenizer_processor}), *(callbacks or [])],
        skip_nonfinite_steps=training_args.skip_nonfinite_steps,
    )

    def save_tokenizer_processor():
        tokenizer_processor.save_pretrained(os.path.join(training_args.output_dir, TOKENIZER_SUBFOLDER))

    return train_and_evaluate(
        trainer,
        training_args,
        skipped,
        after_save=save_tokenizer_processor,
        dataset_name=data_args.dataset_name,
        train_dir=data_args.train_dir,
    )


__all__ = [
    "train_and_evaluate",
    "require_action",
    "DATA_DEFAULTS",
    "DataArguments",
    "MIM_MODELS",
    "MODEL_SIZES",
    "ModelArguments",
    "build_replacement_generator",
    "fit_tokenizer",
    "MimTrainingArguments",
    "main",
    "parse_config_overrides",
    "resolve_data_defaults",
]


if __name__ == "__main__":
    from ..cli import run_command

    run_command(main)
