"""Fine-tune a pretrained encoder for image classification: `accelerate launch scripts/run_image_classification.py ...`.

BEiT's fine-tuning recipe (unilm `run_class_finetuning.py`) on `Trainer`: the encoder becomes a stock
transformers `BeitForImageClassification` (mean pooling with `fc_norm`, per-layer relative position bias
tables copied from the shared pre-training table), trained with layer-wise learning-rate decay, drop
path, label smoothing and optional Mixup/CutMix. Accuracy is computed by hf_mim's `evaluate` module. The
saved model and image processor are plain transformers BEiT files.
"""

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from datasets import ClassLabel
from transformers import BeitConfig, BeitForImageClassification, Trainer, set_seed

from ..arguments import command_parser, flags_set
from ..data import (
    LabelledImageDatasetArguments,
    MimDataCollator,
    RenderingArguments,
    SkippedImageCounter,
    TwoViewTransform,
    apply_transform,
    center_crop_view,
    parse_rand_augment,
    require_label_column,
    unseen_labels,
    load_image_datasets_from_args,
)
from ..errors import UsageError
from ..evaluation.export import (
    BEIT_POOLERS,
    encoder_image_processor,
    image_processor_at_size,
    load_image_processor,
    load_pretrained_beit,
    resolve_encoder,
    to_beit_image_processor,
    to_transformers_beit,
)
from ..evaluation.metrics import load_metric
from ..models.beit_backbone import keep_position_index_on_device
from .arguments import HfMimTrainingArguments, require_learning_rate, warn_of_transformers_optimisation_defaults
from .loading import require_new_output_dir, require_output_dir_of
from .mixup import MixupCutmix, soft_target_cross_entropy
from .trainer import MimTrainer
from .workflow import require_action, require_no_earlier_model, run_flags, setup_logging, train_and_evaluate

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        metadata={"help": "The pretrained encoder: an hf_mim MIM checkpoint or encoder, or a transformers BEiT checkpoint"}
    )
    image_processor_name: str | None = field(default=None, metadata={"help": "Image processor (default: the model's)"})
    pooling: str = field(default="mean", metadata={"help": "mean (BEiT fine-tuning: mean of patch tokens + fc_norm) or cls"})
    drop_path_rate: float = field(default=0.1, metadata={"help": "Stochastic depth of the last layer (linear in depth)"})
    layer_decay: float | None = field(
        default=0.65, metadata={"help": "Layer-wise learning-rate decay (BEiT base: 0.65; BEiT v2 base: 0.6); 1 disables"}
    )
    head_init_scale: float = field(default=0.001, metadata={"help": "Scale of the new classifier's initial weights"})
    image_size: int | None = field(
        default=None,
        metadata={"help": "Fine-tune at another resolution (e.g. 384 after 224 pre-training): the relative position "
                  "bias tables and the image processor are resized (default: the pre-training size)"},
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Cache folder of Hub models and datasets"})
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of Hub models"})
    token: str | None = field(default=None, metadata={"help": "Hub token (default: the logged-in one)"})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Let Hub models run their own code (not needed for hf_mim's models)"}
    )

    def __post_init__(self):
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise UsageError(f"--drop_path_rate is a probability in [0, 1), got {self.drop_path_rate}")
        if self.layer_decay is not None and not 0.0 < self.layer_decay <= 1.0:
            raise UsageError(f"--layer_decay scales each earlier layer's rate, in (0, 1] (1 disables), got {self.layer_decay}")
        if self.head_init_scale <= 0:
            raise UsageError(f"--head_init_scale must be positive, got {self.head_init_scale}")
        if self.image_size is not None and self.image_size < 1:
            raise UsageError(f"--image_size must be a positive number of pixels, got {self.image_size}")


@dataclass
class DataArguments(RenderingArguments, LabelledImageDatasetArguments):
    rand_augment: str = field(
        default="rand-m9-mstd0.5-inc1", metadata={"help": "timm RandAugment config of the training view (BEiT recipe); '' disables"}
    )
    random_erasing: float = field(
        default=0.25, metadata={"help": "Probability of erasing a rectangle of the training view with noise (BEiT recipe); 0 disables"}
    )
    mixup: float = field(default=0.0, metadata={"help": "Mixup alpha (BEiT recipes: 0.8); 0 disables"})
    cutmix: float = field(default=0.0, metadata={"help": "CutMix alpha (BEiT recipes: 1.0); 0 disables"})
    mixup_prob: float = field(default=1.0, metadata={"help": "Probability of mixing a batch"})
    mixup_switch_prob: float = field(default=0.5, metadata={"help": "Probability of CutMix instead of Mixup when both are on"})
    label_smoothing: float = field(default=0.1, metadata={"help": "Label smoothing of the cross-entropy; 0 disables"})

    def __post_init__(self):
        for name in ("random_erasing", "mixup_prob", "mixup_switch_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UsageError(f"--{name} is a probability in [0, 1], got {getattr(self, name)}")
        for name in ("mixup", "cutmix"):
            if getattr(self, name) < 0:
                raise UsageError(f"--{name} is an alpha >= 0 (0 disables it), got {getattr(self, name)}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise UsageError(f"--label_smoothing must lie in [0, 1), got {self.label_smoothing}")
        if self.mixup == 0 and self.cutmix == 0:
            given = flags_set(self, ("mixup_prob", "mixup_switch_prob"))
            if given:
                raise UsageError(f"--{given[0]} tunes --mixup / --cutmix, which are off and would ignore it: remove it or "
                                 "turn one on")
        if self.rand_augment:
            try:
                parse_rand_augment(self.rand_augment)
            except ValueError as error:
                raise UsageError(f"--rand_augment {self.rand_augment!r}: {error}") from error
        super().__post_init__()


@dataclass
class ClassificationTrainingArguments(HfMimTrainingArguments):
    # The label column is renamed to `labels`; the transform already drops every other column.
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Drop the dataset columns that the model's forward does not take (off: the image column "
                  "is transformed when read)"},
    )
    # The loss is a per-batch mean that never reads Trainer's item count; counting the items across processes would
    # be an all-gather per step for nothing.
    average_tokens_across_devices: bool = field(
        default=False, metadata={"help": "Gather the label count over processes each step (unused by this loss)"}
    )

    def __post_init__(self):
        if self.average_tokens_across_devices:
            # Besides, a process whose batch was undecodable would skip the gather the others wait in.
            raise UsageError(
                "--average_tokens_across_devices gathers a label count every step that the classification loss (a "
                "per-batch mean) never reads: remove it"
            )
        super().__post_init__()


def accuracy_of(accuracy, prediction) -> dict[str, float]:
    """`compute_metrics`: the `accuracy` metric over the evaluated images; label -100 marks the positions of
    undecodable ones (`MimTrainer.prediction_step` under several processes)."""
    evaluated = prediction.label_ids != -100
    return accuracy.compute(
        predictions=prediction.predictions[evaluated], references=prediction.label_ids[evaluated]
    )


def classification_loss(outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """`Trainer`'s `compute_loss_func`: cross-entropy against class ids or (mixed, smoothed) soft targets."""
    return soft_target_cross_entropy(outputs.logits, labels)


class ImageClassificationTrainer(MimTrainer):
    """`MimTrainer` (layer decay, non-finite loss guard) that mixes training batches and scores soft targets.

    Args:
        mixup ([`MixupCutmix`], *optional*): Applied to every training batch; turns labels into soft targets.
    """

    # `soft_target_cross_entropy` is a per-batch mean: Trainer divides it by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, *args, mixup: MixupCutmix | None = None, **kwargs):
        super().__init__(*args, compute_loss_func=classification_loss, **kwargs)
        self.mixup = mixup
        self._mixed_step, self._mixed_micro_batches = -1, 0
        # Training images of each class this launch, counted on the device.
        self.class_counts: torch.Tensor | None = None

    def train(self, *args, **kwargs):
        result = super().train(*args, **kwargs)
        # Every process reduces, one whose batches were all undecodable (no count of its own) too.
        if self.class_counts is not None or self.accelerator.num_processes > 1:
            num_labels = self.model.config.num_labels
            own = self.class_counts.tolist() if self.class_counts is not None else [0] * num_labels
            counts = self.summed_over_processes(*own)
            names = self.model.config.id2label
            unseen = [names[index] for index, count in enumerate(counts) if count == 0]
            if unseen and self.is_world_process_zero():
                logger.warning(
                    f"No training image of the classes {unseen[:10]} reached this launch (all undecodable, or too few "
                    "steps): the classifier's outputs for them are untrained"
                )
        return result

    def mixing_rng(self) -> np.random.Generator:
        """The generator of this micro-batch's mixing, keyed by (seed, process, optimiser step, micro-batch): a resumed
        run mixes its batches as the uninterrupted run did (torch's RNG would depend on what else drew from it)."""
        step = self.state.global_step
        self._mixed_micro_batches = self._mixed_micro_batches + 1 if step == self._mixed_step else 0
        self._mixed_step = step
        return np.random.default_rng((self.args.seed, self.args.process_index, step, self._mixed_micro_batches))

    def create_model_card(self, **kwargs) -> None:
        # A stock transformers classifier fine-tuned from a checkpoint: transformers' own card describes it.
        return Trainer.create_model_card(self, **{"tasks": "image-classification", **kwargs})

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training and not self.stand_in:
            # `model` may be wrapped (DDP); the class count is the unwrapped model's.
            num_labels = self.model.config.num_labels
            if self.class_counts is None:
                self.class_counts = torch.zeros(num_labels, dtype=torch.long, device=inputs["labels"].device)
            # index_add_, not bincount: bincount reads the largest label on the host to size its output.
            self.class_counts.index_add_(0, inputs["labels"], torch.ones_like(inputs["labels"]))
        if model.training and self.mixup is not None:
            pixel_values, labels = self.mixup(inputs["pixel_values"], inputs["labels"], rng=self.mixing_rng())
            inputs = {**inputs, "pixel_values": pixel_values, "labels": labels}
        # Without `num_items_in_batch` Trainer takes the loss as the per-batch mean it is (no rescaling across
        # devices, which would count soft-target entries as items).
        return super().compute_loss(model, inputs, return_outputs=return_outputs)


def encode_labels(raw, label_column: str, cause: str | None = None) -> tuple[object, list[str]]:
    """Class names, and the splits with integer ids in a `labels` column (the name `BeitForImageClassification` takes).
    `cause` names the flags that may have left a class without training images (e.g. `--train_val_split 0.9`)."""
    require_label_column(raw, label_column)
    for split in raw:
        # A class with no training image cannot be learnt.
        unseen = unseen_labels(raw, label_column, split)
        if unseen:
            fix = "give every class training images, or remove those from the evaluation data"
            if cause:
                fix = f"{cause} may have left them none: change it, or {fix}"
            raise UsageError(f"The {split} split has labels that train does not: {unseen[:10]}; {fix}")
    feature = raw["train"].features[label_column]
    if isinstance(feature, ClassLabel):
        names = list(feature.names)
    else:
        values = sorted(raw["train"].unique(label_column))
        index = {value: i for i, value in enumerate(values)}
        for split in raw:
            raw[split] = raw[split].map(
                lambda batch: {label_column: [index[value] for value in batch[label_column]]},
                batched=True,
            )
        names = [str(value) for value in values]
    if label_column != "labels":
        for split in raw:
            raw[split] = raw[split].rename_column(label_column, "labels")
    return raw, names


# What a fine-tuning evaluation reports besides its timings: the loss and compute_metrics' accuracy.
CLASSIFICATION_METRICS = ("accuracy", "loss")


def build_classifier(source, model_args: ModelArguments, class_names: list[str]) -> BeitForImageClassification:
    """A stock `BeitForImageClassification` whose encoder is that of `source` (a pretrained model, e.g. from
    `load_pretrained_beit`), with per-layer relative position tables."""
    if model_args.pooling not in BEIT_POOLERS:
        raise UsageError(f"--pooling must be one of {BEIT_POOLERS}, got {model_args.pooling!r}")
    encoder = to_transformers_beit(
        source,
        pooling=model_args.pooling,
        per_layer_relative_position_bias=True,
        drop_path_rate=model_args.drop_path_rate,
        **({} if model_args.image_size is None else {"image_size": model_args.image_size}),
        id2label=dict(enumerate(class_names)),
        label2id={name: i for i, name in enumerate(class_names)},
    )
    model = BeitForImageClassification(encoder.config)
    model.beit.load_state_dict(encoder.state_dict(), strict=True)
    keep_position_index_on_device(model)
    with torch.no_grad():
        # A near-zero head keeps the first steps from disturbing the pretrained features (unilm `init_scale`).
        model.classifier.weight.mul_(model_args.head_init_scale)
        model.classifier.bias.mul_(model_args.head_init_scale)
    return model


def parse_args(argv=None):
    parser = command_parser(
        (ModelArguments, DataArguments, ClassificationTrainingArguments),
        description="""
        Fine-tune a pretrained encoder for image classification with BEiT's recipe (unilm run_class_finetuning.py)
        on the transformers Trainer: the encoder becomes a stock transformers BeitForImageClassification (mean
        pooling with fc_norm, per-layer relative position bias tables copied from the shared pre-training table),
        trained with layer-wise learning-rate decay, drop path, label smoothing, RandAugment, random erasing and
        optional Mixup/CutMix. Accuracy comes from hf_mim's `evaluate` module. --output_dir receives plain
        transformers BEiT files (model and image processor).

        examples:
          # BEiT-B recipe (lr 4e-3 at batch 1024, 100 epochs, layer decay 0.65), scaled to batch 64
          hf-mim finetune --model_name_or_path ./beit --train_dir ./train --validation_dir ./val \\
              --output_dir ./beit-finetuned --do_train --do_eval --num_train_epochs 100 \\
              --per_device_train_batch_size 64 --learning_rate 2.5e-4 --weight_decay 0.05 --warmup_steps 0.2 \\
              --lr_scheduler_type cosine_with_min_lr --lr_scheduler_kwargs '{"min_lr": 1e-6}' --max_grad_norm 0 \\
              --mixup 0.8 --cutmix 1.0 --eval_strategy epoch --save_strategy epoch

          # Several GPUs
          accelerate launch --multi_gpu --num_processes 8 -m hf_mim finetune ... --bf16
        """,
        groups=[
            ("model", [ModelArguments]),
            ("data", [LabelledImageDatasetArguments]),
            ("augmentation and regularisation", [DataArguments]),
        ],
        json_file=True,
    )
    return parser.parse_command_line(argv)


def main(argv=None) -> dict[str, float]:
    model_args, data_args, training_args = parse_args(argv)
    require_action(training_args)
    require_learning_rate(training_args, "the classifier")
    require_new_output_dir(training_args.output_dir, model_args.model_name_or_path)
    if training_args.do_train:
        require_output_dir_of(training_args.output_dir, BeitConfig.model_type, "BeitForImageClassification")
        require_no_earlier_model(
            training_args,
            {"model_name_or_path": model_args.model_name_or_path, "image_processor_name": model_args.image_processor_name},
        )
    # timm, hence BEiT's fine-tuning recipe, jitters colours only without RandAugment.
    data_args = data_args.with_view_defaults(color_jitter=0.0 if data_args.rand_augment else 0.4)
    wanted = training_args.metric_for_best_model
    if wanted is not None and wanted.removeprefix("eval_") not in CLASSIFICATION_METRICS:
        raise UsageError(
            f"--metric_for_best_model {wanted}: fine-tuning's evaluation reports {', '.join(CLASSIFICATION_METRICS)}; "
            "pass one of them"
        )
    if training_args.do_eval and not training_args.do_train:
        # The classifier head is always new (build_classifier): evaluating alone would score random weights.
        raise UsageError(
            "--do_eval without --do_train would score a new, untrained classifier head: add --do_train (a fine-tuned "
            "classifier in --output_dir loads with BeitForImageClassification.from_pretrained for evaluation)"
        )
    setup_logging(training_args)
    warn_of_transformers_optimisation_defaults(
        training_args,
        "BEiT-B fine-tuning at batch 1024: --learning_rate 4e-3 --weight_decay 0.05 --layer_decay 0.65 --max_grad_norm 0 "
        "--lr_scheduler_type cosine_with_min_lr --lr_scheduler_kwargs '{\"min_lr\": 1e-6}'",
    )
    set_seed(training_args.seed)

    raw, image_column = load_image_datasets_from_args(
        data_args, training_args.seed, model_args.cache_dir, model_args.token, evaluate=training_args.do_eval
    )
    subsets = [f"--{name} {getattr(data_args, name)}" for name in ("train_val_split", "max_train_samples")
               if getattr(data_args, name)]  # fmt: skip
    raw, class_names = encode_labels(raw, data_args.label_column_name, " and ".join(subsets) or None)

    hub_kwargs = {
        "cache_dir": model_args.cache_dir,
        "revision": model_args.model_revision,
        "token": model_args.token,
        "trust_remote_code": model_args.trust_remote_code,
    }
    source = load_pretrained_beit(model_args.model_name_or_path, **hub_kwargs)
    trained_head = [name for name in source.config.architectures or [] if name.endswith("ForImageClassification")]
    if trained_head:
        # Fine-tuning a fine-tuned classifier further is legitimate, but its head goes without a word otherwise.
        logger.warning(
            f"--model_name_or_path {model_args.model_name_or_path} is an image classifier ({trained_head[0]}, "
            f"{len(source.config.id2label)} classes): its encoder is fine-tuned with a new head for the "
            f"{len(class_names)} classes here; its own head is not used"
        )
    patch_size = resolve_encoder(source).config.patch_size
    if model_args.image_size is not None and model_args.image_size % patch_size:
        raise UsageError(
            f"--image_size {model_args.image_size} is not a multiple of the encoder's {patch_size} px patches; pass "
            f"e.g. {max(1, round(model_args.image_size / patch_size)) * patch_size}"
        )
    model = build_classifier(source, model_args, class_names)
    image_processor = load_image_processor(model_args.model_name_or_path, model_args.image_processor_name, **hub_kwargs)
    view = encoder_image_processor(image_processor, resolve_encoder(source).config)
    if model_args.image_size is not None:
        view = image_processor_at_size(view, model_args.image_size)
    del source  # the MIM model (tokenizer included) is not fine-tuned; only its encoder weights were copied
    side = model.config.image_size
    if view.output_size != (side, side):
        raise UsageError(
            f"The image processor produces {view.output_size[0]}x{view.output_size[1]} images but the model takes "
            f"{side}x{side}; pass --image_processor_name with a processor of the model's size"
        )

    # BEiT's evaluation view (Resize(256) + CenterCrop(224); no margin from 384 px), saved as the fine-tuned model's
    # processor so that its users preprocess as the reported accuracy did.
    eval_view = center_crop_view(view)
    skipped, eval_skipped = SkippedImageCounter(), SkippedImageCounter()
    train_dataset = eval_dataset = None
    if training_args.do_train:
        transform = TwoViewTransform(
            view,
            rand_augment=data_args.rand_augment or None,
            random_erasing=data_args.random_erasing,
            **data_args.view_options(),
        )
        # Each example's augmentation comes from its own generator (seed, epoch, index), so a resumed run redraws it.
        train_dataset = apply_transform(
            raw["train"], image_column, transform, skipped, keep_columns=("labels",), seed=training_args.seed
        )
    if training_args.do_eval:
        eval_dataset = apply_transform(
            raw["validation"], image_column, TwoViewTransform(eval_view, train=False), eval_skipped, ("labels",)
        )

    mixup = None
    if data_args.mixup > 0 or data_args.cutmix > 0 or data_args.label_smoothing > 0:
        mixup = MixupCutmix(
            len(class_names),
            mixup_alpha=data_args.mixup,
            cutmix_alpha=data_args.cutmix,
            prob=data_args.mixup_prob,
            switch_prob=data_args.mixup_switch_prob,
            label_smoothing=data_args.label_smoothing,
        )
    accuracy = load_metric("accuracy")
    trainer = ImageClassificationTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=MimDataCollator(),
        processing_class=to_beit_image_processor(eval_view),
        compute_metrics=lambda prediction: accuracy_of(accuracy, prediction),
        preprocess_logits_for_metrics=lambda logits, labels: logits.argmax(dim=-1),
        layer_decay=model_args.layer_decay,
        mixup=mixup,
    )

    flags = run_flags(training_args, model_args, data_args, loaded={"image_processor_name": view})
    return train_and_evaluate(trainer, training_args, skipped, eval_skipped=eval_skipped, model_card=False, flags=flags)


__all__ = [
    "CLASSIFICATION_METRICS",
    "ClassificationTrainingArguments",
    "DataArguments",
    "ImageClassificationTrainer",
    "ModelArguments",
    "accuracy_of",
    "build_classifier",
    "classification_loss",
    "encode_labels",
    "main",
]


if __name__ == "__main__":
    from ..cli import run_command

    run_command(main)
