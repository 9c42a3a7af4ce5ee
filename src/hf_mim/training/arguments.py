"""Arguments shared by the hf_mim training commands: `TrainingArguments` with a time budget, non-finite guard,
resumption, DataLoader defaults for GPUs and a refusal to run a multi-process launch whose processes are not
distributed (`HfMimTrainingArguments`); those of the commands that train on raw images with targets from a tokenizer
(`MimTrainingArguments`); and `--config_overrides`."""

import inspect
import json
import logging
import os
import re
from dataclasses import dataclass, field

import torch
from transformers import Trainer, TrainingArguments
from transformers.integrations import INTEGRATION_TO_CALLBACK
from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION
from transformers.trainer_utils import SchedulerType

from ..arguments import flags_set
from ..errors import UsageError
from .loading import require_folder_path

logger = logging.getLogger(__name__)


def check_distributed_launch(training_args: TrainingArguments) -> None:
    """Refuse a launch that started several processes which `Trainer` runs as independent single-process runs.

    `accelerate launch --multi_gpu --num_processes N` on a machine without GPUs (and without `--use_cpu`) sets up a
    process group, but transformers then trains each process alone on all the data, all writing one output folder.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and training_args.world_size == 1:
        raise UsageError(
            f"the launcher started {launched} processes but Trainer runs each alone (no GPU visible to them?), so "
            "each would train on all the data into the same --output_dir; on a CPU machine add --use_cpu to the "
            "script's flags (accelerate launch --multi_gpu --num_processes N script.py ... --use_cpu), on a GPU "
            "machine check that torch.cuda.device_count() sees the GPUs"
        )


def check_optional_packages(training_args: TrainingArguments) -> None:
    """Refuse `--report_to` integrations and `--optim` optimisers whose packages are not installed, at launch:
    `Trainer` finds them missing only after the data is read (the loggers) or as training starts (the optimiser)."""
    for name in training_args.report_to:
        if name in INTEGRATION_TO_CALLBACK:
            try:
                INTEGRATION_TO_CALLBACK[name]()
            except (ImportError, RuntimeError) as error:
                raise UsageError(f"--report_to {name}: {error} (or leave {name} out of --report_to)") from error
    optim = training_args.optim.value
    try:
        Trainer.get_optimizer_cls_and_kwargs(training_args)
    except (ImportError, ValueError) as error:
        if isinstance(error, ImportError) or "install" in str(error):
            raise UsageError(f"--optim {optim}: {error} (or pick another --optim)") from error
        # GaLore, APOLLO and LOMO build their optimiser from the model itself.
        raise UsageError(
            f"--optim {optim} builds its optimiser from the model, not from the parameter groups (layer decay, no "
            "weight decay on norms and biases) hf_mim's commands train with: pick another --optim"
        ) from error


# What Trainer passes the schedule itself; the rest of a schedule function's parameters come from --lr_scheduler_kwargs.
_SCHEDULER_ARGUMENTS_FROM_TRAINER = {"optimizer", "num_warmup_steps", "num_training_steps", "last_epoch"}


def check_scheduler_kwargs(training_args: TrainingArguments) -> None:
    """Refuse `--lr_scheduler_kwargs` that `--lr_scheduler_type` does not read (a `TypeError` when training starts),
    and a minimum-rate schedule without its minimum (a `ValueError` then)."""
    schedule = SchedulerType(training_args.lr_scheduler_type)
    function = TYPE_TO_SCHEDULER_FUNCTION[schedule]
    parameters = inspect.signature(function).parameters
    kwargs = training_args.lr_scheduler_kwargs or {}
    if any(parameter.kind is parameter.VAR_KEYWORD for parameter in parameters.values()):
        return
    readable = [name for name in parameters if name not in _SCHEDULER_ARGUMENTS_FROM_TRAINER]
    unread = [name for name in kwargs if name not in readable]
    if unread:
        raise UsageError(
            f"--lr_scheduler_kwargs {json.dumps(kwargs)}: --lr_scheduler_type {schedule.value} does not read "
            f"{', '.join(unread)} (it reads {', '.join(readable) or 'nothing'}); pick the schedule that reads them "
            "(min_lr: cosine_with_min_lr) or remove them"
        )
    if "min_lr" in parameters and "min_lr_rate" in parameters and not {"min_lr", "min_lr_rate"} & set(kwargs):
        raise UsageError(
            f"--lr_scheduler_type {schedule.value} decays to a minimum that is not given: pass --lr_scheduler_kwargs "
            "'{\"min_lr\": 1e-6}' (or min_lr_rate, a fraction of --learning_rate)"
        )


@dataclass
class HfMimTrainingArguments(TrainingArguments):
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start afresh even if output_dir holds checkpoints (else resume from the last); the "
                  "checkpoints, state, results and card of the earlier run there are removed, so that no later launch "
                  "resumes them"},
    )
    skip_nonfinite_steps: bool = field(
        default=False,
        metadata={"help": "Skip (and count) optimiser steps whose loss is non-finite instead of stopping the run "
                  "(costs one host synchronisation per step)"},
    )
    max_train_seconds: float | None = field(
        default=None, metadata={"help": "Stop training after this many seconds of wall-clock time"}
    )
    # Re-spawning workers at every epoch leaves the GPU idle while they start (about 1.5 s per epoch on an H200).
    dataloader_persistent_workers: bool | None = field(
        default=None,
        metadata={"help": "Keep DataLoader workers alive between epochs (default: on when "
                  "--dataloader_num_workers > 0)"},
    )

    # Pinned host memory only speeds up copies to a GPU; without one torch warns at every DataLoader it builds.
    dataloader_pin_memory: bool | None = field(
        default=None, metadata={"help": "Pin batches in page-locked memory (default: on when training on a GPU)"}
    )

    # transformers' filter tests every step's loss on the host (`torch.isnan(loss) or ...`), a synchronisation per
    # step; a non-finite loss stops the run at the next logging step anyway, unless such steps are skipped.
    logging_nan_inf_filter: bool | None = field(
        default=None,
        metadata={"help": "Leave non-finite losses out of the logged loss (default: with --skip_nonfinite_steps "
                  "only; costs one host synchronisation per step)"},
    )

    def __post_init__(self):
        if self.dataloader_pin_memory is None:
            self.dataloader_pin_memory = torch.cuda.is_available() and not self.use_cpu
        if self.logging_nan_inf_filter is None:
            self.logging_nan_inf_filter = self.skip_nonfinite_steps
        if self.dataloader_pin_memory and self.accelerator_config is None:
            # Copies of pinned batches to the GPU need not wait for the host (accelerate's default waits).
            self.accelerator_config = {"non_blocking": True}
        if self.dataloader_persistent_workers is None:
            self.dataloader_persistent_workers = self.dataloader_num_workers > 0
        if self.max_train_seconds is not None and self.max_train_seconds <= 0:
            raise UsageError(f"--max_train_seconds must be positive, got {self.max_train_seconds}")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name} must be at least 1, got {getattr(self, name)}")
        require_folder_path("output_dir", self.output_dir)
        if self.do_train and self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise UsageError(
                f"--num_train_epochs {self.num_train_epochs} trains for no step (and saves the model as it started): "
                "pass a positive --num_train_epochs or --max_steps"
            )
        if self.max_steps > 0 and "num_train_epochs" in flags_set(self, ["num_train_epochs"]):
            raise UsageError(
                f"--num_train_epochs {self.num_train_epochs} is ignored where --max_steps {self.max_steps} gives the "
                "length of training: pass one of them"
            )
        if self.include_num_input_tokens_seen not in (False, "no"):
            # It counts text tokens (here pixel values), gathered every step, which a process whose batch was
            # undecodable would skip while the others wait.
            raise UsageError(
                "--include_num_input_tokens_seen counts the tokens of text inputs, and hf_mim's inputs are images: "
                "remove it"
            )
        if self.batch_eval_metrics:
            # Fine-tuning's accuracy takes the whole set's predictions (and no compute_result); MIM has no metric there.
            raise UsageError(
                "--batch_eval_metrics computes metrics batch by batch, and hf_mim's are computed over the whole "
                "evaluation set: remove it"
            )
        if "inputs" in (self.include_for_metrics or []):
            # Trainer gathers the decodable rows of each batch, of another length on each process where one was not.
            raise UsageError(
                "--include_for_metrics inputs gathers every evaluation batch's pixel values, which no hf_mim metric "
                "reads: remove it"
            )
        if self.do_train and self.max_steps == 0:
            # transformers runs one step for it, and the model is saved as trained.
            raise UsageError("--max_steps 0 trains no step: pass a positive --max_steps, or leave it out to train for "
                             "--num_train_epochs")
        # 0 stays allowed here: what a tokenizer run then changes, it changes without the optimiser (dVAE code
        # balancing, VQ-KD's EMA codebook), as the two-process balancing test does on purpose; pre-training and
        # fine-tuning refuse it (`require_learning_rate`).
        if self.learning_rate < 0:
            raise UsageError(f"--learning_rate must not be negative, got {self.learning_rate}")
        # torch's AdamW refuses these only when the optimiser is built, after the data and the model have loaded.
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UsageError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        if self.adam_epsilon < 0:
            raise UsageError(f"--adam_epsilon must not be negative, got {self.adam_epsilon}")
        # Negative values mean nothing to transformers: no decay, and no clipping, without a word.
        if self.weight_decay < 0:
            raise UsageError(f"--weight_decay must not be negative, got {self.weight_decay} (0 turns it off)")
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            raise UsageError(f"--max_grad_norm must not be negative, got {self.max_grad_norm} (0 turns clipping off)")
        if self.label_smoothing_factor != 0:
            raise UsageError(
                "--label_smoothing_factor is transformers' smoother of `labels`, which hf_mim's losses do not read "
                "(MIM targets are tokenizer ids): remove it; fine-tuning smooths with --label_smoothing"
            )
        if self.dataloader_num_workers < 0:
            raise UsageError(f"--dataloader_num_workers must be 0 (load in the main process) or more, got "
                             f"{self.dataloader_num_workers}")
        check_flags_of_schedules_off(self)
        check_metric_direction(self)
        try:
            super().__post_init__()
        except UsageError:
            raise
        except ValueError as error:
            # TrainingArguments' own checks of its flags' combinations, several lines each, naming the flags.
            raise UsageError(" ".join(str(error).split())) from error
        if not self.push_to_hub:
            hub_flags = ["hub_model_id", "hub_revision"]
            if "trackio" not in self.report_to:  # the trackio logger creates its Space private with it
                hub_flags.append("hub_private_repo")
            ignored = [f"--{name}" for name in hub_flags if getattr(self, name)]
            if ignored:
                raise UsageError(f"{', '.join(ignored)} set where the run pushes to the Hub, but --push_to_hub is not "
                                 "given: add --push_to_hub or remove them")
        if self.save_strategy == "best" and self.metric_for_best_model is None:
            raise UsageError("--save_strategy best saves when --metric_for_best_model improves, which is not given: "
                             "pass e.g. --metric_for_best_model eval_loss")
        if self.fp16 and self.device.type == "cpu":
            # accelerate accepts fp16 on the CPU and then runs in float32.
            raise UsageError("--fp16 has no effect on the CPU (the run would be float32): remove it, or pass --bf16 "
                             "for bfloat16 autocast on the CPU")
        check_scheduler_kwargs(self)
        check_optional_packages(self)
        check_distributed_launch(self)


def check_flags_of_schedules_off(args: TrainingArguments) -> None:
    """A one-line error for a flag of an evaluation, saving or logging schedule that the run does not follow (Trainer
    ignores it without a word): `--eval_steps` without `--eval_strategy steps`, `--save_total_limit` with `--save_strategy
    no`, `--greater_is_better` without a metric, an evaluation batch size for a run that does not evaluate, ...
    Called before TrainingArguments fills in its own values (e.g. `eval_steps` from `logging_steps`)."""
    strategies = {name: flag_value(getattr(args, name)) for name in ("eval_strategy", "save_strategy", "logging_strategy")}
    # --logging_steps is also the evaluation interval of --eval_strategy steps without --eval_steps.
    logging_steps_read = strategies["logging_strategy"] == "steps" or (
        strategies["eval_strategy"] == "steps" and args.eval_steps is None
    )
    ignored = [
        (flag, f"--{strategy} steps", f"--{strategy} is {strategies[strategy]}")
        for strategy, flags, read in (("eval_strategy", ["eval_steps"], strategies["eval_strategy"] == "steps"),
                                      ("save_strategy", ["save_steps"], strategies["save_strategy"] == "steps"),
                                      ("logging_strategy", ["logging_steps"], logging_steps_read))  # fmt: skip
        if not read
        for flag in flags_set(args, flags)
    ]
    if strategies["save_strategy"] == "no":
        ignored += [(flag, "a --save_strategy", "--save_strategy is no") for flag in
                    flags_set(args, ["save_total_limit", "save_only_model"])]  # fmt: skip
    if strategies["eval_strategy"] == "no":
        ignored += [(flag, "an --eval_strategy", "--eval_strategy is no") for flag in flags_set(args, ["eval_delay"])]
        if not args.do_eval:
            ignored += [(flag, "--do_eval", "the run does not evaluate") for flag in
                        flags_set(args, ["per_device_eval_batch_size"])]  # fmt: skip
    if best_model_metric(args) is None:
        ignored += [(flag, "--metric_for_best_model", "no metric is given") for flag in
                    flags_set(args, ["greater_is_better"])]  # fmt: skip
    if ignored:
        flag, needs, but = ignored[0]
        raise UsageError(f"--{flag} {flag_value(getattr(args, flag))} takes effect with {needs}, but {but}: it would be ignored; "
                         f"add {needs} or remove --{flag}")


def best_model_metric(args: TrainingArguments) -> str | None:
    """The metric that decides the best checkpoint: `--metric_for_best_model`, else the loss where TrainingArguments
    fills it in (with `--load_best_model_at_end` or a schedule that reads it); None when nothing reads one."""
    schedule = flag_value(args.lr_scheduler_type)
    if args.metric_for_best_model is None and (args.load_best_model_at_end or schedule in ("reduce_lr_on_plateau", "greedy")):
        return "loss"
    return args.metric_for_best_model


def check_metric_direction(args: TrainingArguments) -> None:
    """A one-line error for a `--greater_is_better` that contradicts its `--metric_for_best_model` (a higher loss, a
    lower accuracy): the run would keep, and with `--load_best_model_at_end` end on, its worst checkpoint."""
    metric, greater = best_model_metric(args), args.greater_is_better
    if metric is None or greater is None:
        return
    name = metric.removeprefix("eval_")
    better = True if name.endswith("accuracy") else False if name.endswith("loss") else None
    if better is not None and bool(greater) != better:
        given = f"--metric_for_best_model {metric}" if args.metric_for_best_model else f"the {metric} (the default metric)"
        raise UsageError(
            f"--greater_is_better {greater} with {given}: a {'higher' if better else 'lower'} "
            f"{name} is better, so the run would keep its worst checkpoint; remove --greater_is_better (it follows "
            "the metric)"
        )


def require_learning_rate(training_args: TrainingArguments, what: str) -> None:
    """A one-line error for `--learning_rate 0` where the optimiser is all that trains `what` (pre-training,
    fine-tuning): the run would save the weights it started from as trained."""
    if training_args.do_train and training_args.learning_rate == 0:
        raise UsageError(
            f"--learning_rate 0 leaves {what} as it starts (only the optimiser trains it): pass a positive --learning_rate"
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

    def __post_init__(self):
        for name in ("bf16_full_eval", "fp16_full_eval"):
            if getattr(self, name):
                # Trainer casts the whole model, so the frozen tokenizer, the dVAE's logits and codebook distances.
                raise UsageError(
                    f"--{name} casts the whole model to {name[:4]} to evaluate, its float32 tokenizer and codebook "
                    f"included, which cannot compute targets in it: remove it (--{name[:4]} evaluates under autocast, "
                    "with targets in float32)"
                )
        super().__post_init__()


def config_from_flags(build, flags: str):
    """`build()`, a config's construction, with the config's own validation errors (which name the field and a fix)
    as a one-line `UsageError` that names the `flags` that set it."""
    try:
        return build()
    except ValueError as error:
        if isinstance(error, UsageError):
            raise
        raise UsageError(f"{flags} give an invalid config: {error}") from error


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
    try:
        probe.update_from_string(",".join(f"{name}={value}" for name, (_, value) in zip(names, items)))
    except ValueError as error:
        # transformers names the unknown key or the value it could not convert.
        raise UsageError(
            f"--config_overrides {overrides!r}: {error} (the names are {config_class.model_type} config fields, "
            "the values of their types)"
        ) from error
    return {name: getattr(probe, name) for name in names}


def flag_value(value):
    """A flag's value as the user would type it: enums (a strategy, the scheduler type) as their values, floats as
    %g, dicts as JSON."""
    value = getattr(value, "value", value)
    return json.dumps(value) if isinstance(value, dict) else (f"{value:g}" if isinstance(value, float) else value)


def warn_of_transformers_optimisation_defaults(args: TrainingArguments, recipe: str) -> None:
    """A warning, before training, naming the optimiser flags of `recipe` (e.g. "BEiT at batch 2048:
    --learning_rate 1.5e-3 --max_grad_norm 3.0") left at transformers' defaults (learning rate 5e-5, no weight
    decay, clipping at 1.0, linear decay to 0), which no MIM paper trains with."""
    # Flags of the command's other arguments (fine-tuning's --layer_decay) have recipe defaults of their own.
    flags = [name for name in re.findall(r"--(\w+)", recipe) if hasattr(args, name)]
    unset = [name for name in flags if not flags_set(args, [name])]
    # Once per launch: every process parses the same flags.
    if args.do_train and unset and args.process_index == 0:
        names = ", ".join(f"--{name}" for name in unset)
        defaults = ", ".join(str(flag_value(getattr(args, name))) for name in unset)
        one = len(unset) == 1
        logger.warning(
            f"{names} {'is' if one else 'are'} unset, so transformers' {'default applies' if one else 'defaults apply'} "
            f"({defaults}), unlike the papers' recipe ({recipe}; the README lists each method's): pass "
            f"{'it' if one else 'them'} to train as the papers do"
        )


__all__ = [
    "HfMimTrainingArguments",
    "MimTrainingArguments",
    "check_distributed_launch",
    "check_optional_packages",
    "check_scheduler_kwargs",
    "config_from_flags",
    "flag_value",
    "parse_config_overrides",
    "require_learning_rate",
    "warn_of_transformers_optimisation_defaults",
]
