"""What every hf_mim training command does around its `Trainer`: logging, the checkpoint to resume, and the tail
(train, check the data, save, evaluate, metrics, model card, push).

`hf-mim pretrain`, `train-tokenizer` and `finetune` build their model, data and `Trainer`, then end in
`train_and_evaluate`.
"""

import contextlib
import dataclasses
import enum
import json
import logging
import os
import re
import shutil
import sys

import datasets
import torch
import transformers
from safetensors import safe_open
from transformers import TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ..data.arguments import RESOLVED_DEFAULT_FLAGS
from ..errors import UsageError
from ..evaluation.features import hash_parts, model_fingerprint
from ..hub.cards import describe_training_data, hub_dataset_id
from ..hub.push import default_repo_id, hub_request_errors
from .loading import is_within, saved_model_type
from .trainer import NO_VALIDATION_IMAGE, NONFINITE_ADVICE

logger = logging.getLogger(__name__)

# Each checkpoint's record of its run (`RunRecordsCallback`): the flags it was launched with (`run_flags`), which a
# resumed run must keep, and the undecodable training images skipped so far, which it carries on counting from.
RUN_RECORD = "hf_mim_run.json"
# TrainingArguments that decide what a run draws and how it updates (a resumed run restores the optimiser and
# schedule states, so a new value would be ignored or mixed with the old one); the number of processes is one too.
TRAJECTORY_TRAINING_FLAGS = (
    "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "optim", "optim_args",
    "max_grad_norm", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "warmup_ratio", "seed",
    "per_device_train_batch_size", "gradient_accumulation_steps", "bf16", "fp16", "data_seed", "dataloader_drop_last",
)  # fmt: skip
# Flags of the commands' own dataclasses that say where things are or how they are read, which may change between
# launches (data moved, a token renewed); every other flag of those dataclasses decides the run.
_LOCATION_FLAGS = {"model_revision", "token", "trust_remote_code", "max_eval_samples"}


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
    """Fail instead of exiting successfully without doing anything (transformers' flags default to off), or without
    doing what a flag asked for."""
    if not (training_args.do_train or training_args.do_eval):
        raise UsageError("Nothing to do: pass --do_train (and/or --do_eval)")
    if training_args.resume_from_checkpoint is not None and not training_args.do_train:
        raise UsageError(
            f"--resume_from_checkpoint {training_args.resume_from_checkpoint} resumes training, and --do_train is not "
            "given: add --do_train, or pass the checkpoint as --model_name_or_path to evaluate it"
        )


def require_weights_to_evaluate(training_args: TrainingArguments, name_or_path: str | None, flag: str, what: str,
                                new: str) -> None:
    """Refuse an evaluation alone (`--do_eval` without `--do_train`) of a model built afresh, which would score its
    random weights: `--flag` (the `what` of `name_or_path`) gives the weights to evaluate; `new` names the fresh one."""
    if training_args.do_eval and not training_args.do_train and not name_or_path:
        raise UsageError(
            f"--do_eval without --do_train evaluates the {what} of --{flag}, which is not given (a new {new} would "
            f"score its random weights): add --{flag} or --do_train"
        )


def require_steps_when_streaming(data_args, training_args: TrainingArguments) -> None:
    """A stream has no length, so Trainer cannot count epochs: a training run on one needs `--max_steps`."""
    if getattr(data_args, "streaming", False) and training_args.do_train and training_args.max_steps <= 0:
        raise UsageError("--streaming reads images as they come, so epochs have no length: pass --max_steps")


def resumption(training_args: TrainingArguments) -> tuple[str, str, str] | None:
    """(the checkpoint a training run resumes from, how to resume from another, how to start afresh instead): the
    one given, else the last in output_dir unless --overwrite_output_dir; None when the run starts afresh."""
    given = training_args.resume_from_checkpoint
    if given is not None:
        if not os.path.isdir(given):
            raise UsageError(f"--resume_from_checkpoint {given}: no such folder; pass a checkpoint-<step> folder")
        return (
            given,
            "pass another checkpoint to --resume_from_checkpoint",
            "drop --resume_from_checkpoint to start afresh (in another --output_dir)",
        )
    if not os.path.isdir(training_args.output_dir) or training_args.overwrite_output_dir or not training_args.do_train:
        return None
    checkpoint = get_last_checkpoint(training_args.output_dir)
    if checkpoint is None:
        return None
    return (
        checkpoint,
        "pass --overwrite_output_dir to start afresh, or --resume_from_checkpoint with an earlier checkpoint",
        "start afresh with --overwrite_output_dir (or another --output_dir)",
    )


def require_no_earlier_model(training_args: TrainingArguments, inputs: dict[str, str | None], refits: str = "") -> None:
    """A one-line error when a training run would start afresh in an `--output_dir` that holds the model an earlier run
    saved there, with no checkpoint of it to continue from (the new run would replace it without a word; `refits`
    says what else `--overwrite_output_dir` would redo), or when `--overwrite_output_dir` would remove a checkpoint
    folder that one of the `inputs` (flag name -> path) loads from."""
    if not training_args.do_train:
        return
    if getattr(training_args, "overwrite_output_dir", False):
        if training_args.resume_from_checkpoint is not None:
            return
        removed = earlier_checkpoints(training_args.output_dir)
        for flag, path in inputs.items():
            if path is not None and os.path.exists(path) and any(is_within(path, folder) for folder in removed):
                raise UsageError(
                    f"--{flag} {path} is a checkpoint in --output_dir, whose checkpoints --overwrite_output_dir removes "
                    "before training: copy it out of the folder first, or pass another --output_dir"
                )
        return
    if not os.path.isfile(os.path.join(training_args.output_dir, "config.json")) or resumption(training_args):
        return
    raise UsageError(
        f"--output_dir {training_args.output_dir} holds the model of an earlier run (its config.json) and no "
        f"checkpoint to continue it from: pass --overwrite_output_dir to train a new one in its place{refits}, or "
        "another --output_dir"
    )


def check_resumption_flags(training_args: TrainingArguments, flags: dict) -> None:
    """`check_run_flags` for the checkpoint the run will resume from, if any: before work that can take hours (a
    tokenizer fit), which the full check (`find_checkpoint`, with the model) would otherwise follow."""
    resumed = resumption(training_args)
    if resumed is not None:
        check_run_flags(resumed[0], flags, resumed[2])


def find_checkpoint(training_args: TrainingArguments, model=None, flags: dict | None = None) -> str | None:
    """The checkpoint to resume from: the one given, else the last in output_dir unless --overwrite_output_dir.

    Says which one (a warning: resuming changes what the run does), warns when it lacks the optimiser or scheduler
    state (they would start afresh), and names an unreadable weights file, one of another model than `model`
    (Trainer would load the weights both share and start the rest afresh, with only a warning) or of another
    tokenizer, and `flags` (`run_flags`) other than the checkpoint's, with the fix.
    """
    resumed = resumption(training_args)
    if resumed is None:
        return None
    checkpoint, fix, afresh = resumed
    check_checkpoint_weights(checkpoint, fix, model)
    if flags is not None:
        check_run_flags(checkpoint, flags, afresh)
    require_steps_left(training_args, checkpoint, afresh)
    missing = [name for name in ("optimizer.pt", "scheduler.pt") if not os.path.isfile(os.path.join(checkpoint, name))]
    if missing:
        logger.warning(f"{checkpoint} has no {' or '.join(missing)}: that state starts afresh")
    given = training_args.resume_from_checkpoint is not None
    how = "" if given else " (the last checkpoint in --output_dir; --overwrite_output_dir starts afresh)"
    logger.warning(f"Resuming training from {checkpoint}{how}")
    return checkpoint


def require_steps_left(training_args: TrainingArguments, checkpoint: str, afresh: str) -> None:
    """A one-line error when `checkpoint` already reached the end the run asks for (`--max_steps`, or
    `--num_train_epochs` without it): Trainer would still run a step past it (the same command launched again after
    it finished resumes its last checkpoint) and save the result as the run's. Resuming the last checkpoint of
    `--output_dir`, the run's own final state there counts too: its last checkpoint may be short of the end (a
    `--save_steps` that does not divide `--max_steps`), and training its tail again would replace the final model."""
    states = [_checkpoint_json(checkpoint, "trainer_state.json")]
    if training_args.resume_from_checkpoint is None:
        states.append(_checkpoint_json(training_args.output_dir, "trainer_state.json"))
    state = max(states, key=lambda state: state.get("global_step", 0))
    if state is not states[0]:
        checkpoint = f"The run in {training_args.output_dir}"
    step, epoch = state.get("global_step", 0), state.get("epoch") or 0.0
    if training_args.max_steps > 0:
        done, end = step >= training_args.max_steps, f"--max_steps {training_args.max_steps}"
    else:
        done, end = epoch >= training_args.num_train_epochs - 1e-6, f"--num_train_epochs {training_args.num_train_epochs:g}"
    if done:
        raise UsageError(
            f"{checkpoint} has already trained to {end} (step {step}, epoch {epoch:g}): nothing is left to train; raise "
            f"{end.split()[0]} to train on, drop --do_train to evaluate only, or {afresh}"
        )


# What an earlier run leaves in `--output_dir` besides its checkpoints that a new run there would be taken to continue
# or to report: its final trainer state, its results (transformers merges new ones into all_results.json) and its
# card (whose reported results an updated card keeps).
EARLIER_RUN_FILES = ("trainer_state.json", "all_results.json", "train_results.json", "eval_results.json", "README.md")


def earlier_checkpoints(folder: str) -> list[str]:
    """The paths of the `checkpoint-<step>` folders in `folder`."""
    if not os.path.isdir(folder):
        return []
    return [
        os.path.join(folder, name) for name in sorted(os.listdir(folder))
        if re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-\d+", name) and os.path.isdir(os.path.join(folder, name))
    ]  # fmt: skip


def clear_earlier_run(training_args: TrainingArguments) -> None:
    """`--overwrite_output_dir` starting afresh: remove the checkpoints, final trainer state, results and card that an
    earlier run left in `--output_dir`. Kept, they would be taken for this run's: a later launch of it (without the
    flag, to continue after an interruption) would resume the earlier run's last checkpoint when its step is higher,
    or stop at once on the earlier run's end, and this run's card would report the earlier model's results. Its
    weights and config are replaced when this run saves. Run by the process that saves, before training; a checkpoint
    the run loads from is refused earlier (`require_no_earlier_model`)."""
    folder = training_args.output_dir
    checkpoints = earlier_checkpoints(folder)
    files = [os.path.join(folder, name) for name in EARLIER_RUN_FILES if os.path.isfile(os.path.join(folder, name))]
    if checkpoints:
        logger.warning(
            f"--overwrite_output_dir: removing the {len(checkpoints)} checkpoint(s) of an earlier run in {folder} "
            f"({', '.join(os.path.basename(path) for path in checkpoints)}), so that no later launch resumes them as "
            "this run's"
        )
    # With --save_on_each_node on a shared file system, each node's first process removes the same files.
    for path in checkpoints:
        shutil.rmtree(path, ignore_errors=True)
    for path in files:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def check_checkpoint_weights(checkpoint: str, fix: str, model=None) -> None:
    """A one-line error naming the file when a checkpoint's safetensors weights are missing or unreadable, or, given
    the `model` to resume, when the checkpoint is of another model type or holds weights of other shapes."""
    files = [os.path.join(checkpoint, name) for name in sorted(os.listdir(checkpoint)) if name.endswith(".safetensors")]
    if not files:
        raise UsageError(f"{checkpoint} holds no *.safetensors weights: {fix}")
    if model is not None:
        saved_type = saved_model_type(checkpoint)
        if saved_type is not None and saved_type != model.config.model_type:
            raise UsageError(f"{checkpoint} is a {saved_type} checkpoint, but this run trains a {model.config.model_type}: {fix}")
    shapes = {} if model is None else {name: tuple(value.shape) for name, value in model.state_dict().items()}
    for path in files:
        try:
            with safe_open(path, framework="pt") as weights:
                saved = {name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()}
        except Exception as error:  # safetensors raises its own error types for truncated or corrupt files
            raise UsageError(f"{path} is unreadable ({error}): {fix}") from error
        changed = sorted(name for name in saved.keys() & shapes.keys() if saved[name] != shapes[name])
        if changed:
            raise UsageError(
                f"{checkpoint} holds {changed[0]} of shape {saved[changed[0]]}, but this run's model has "
                f"{shapes[changed[0]]} (another architecture): {fix}"
            )
        if isinstance(getattr(model, "tokenizer", None), torch.nn.Module):
            check_tokenizer_weights(path, model.tokenizer, fix)


def check_tokenizer_weights(path: str, tokenizer: torch.nn.Module, fix: str) -> None:
    """A one-line error when the weights file `path` of a MIM checkpoint holds another frozen tokenizer than the
    model's: resuming would load the checkpoint's over it, and the run would go on with the old targets."""
    with safe_open(path, framework="pt") as weights:
        for name, value in tokenizer.state_dict().items():
            key = f"tokenizer.{name}"
            if key in weights.keys() and not torch.equal(weights.get_tensor(key), value.detach().cpu()):
                raise UsageError(
                    f"{os.path.dirname(path)} was trained with another tokenizer than this run's "
                    f"(--tokenizer_name_or_path, or the one --fit_tokenizer fitted; {key} differs), and resuming "
                    "would go on with the old one: pass the tokenizer it was trained with (after --fit_tokenizer: "
                    f"resume in the run's own --output_dir, whose fitted tokenizer is reused), or {fix}"
                )


def _decides_the_run(name: str) -> bool:
    # How a k-means tokenizer is fitted shows in its centroids, which `check_tokenizer_weights` compares.
    return not (name.endswith(("_path", "_dir", "_name")) or name.startswith(("kmeans_", "fit_")) or name in _LOCATION_FLAGS)


def _json_value(value):
    return value.value if isinstance(value, enum.Enum) else str(value)


def content_fingerprint(loaded) -> str:
    """What a model or image processor holds, whatever path it was loaded from: `weights <hash>` of a model's
    config and weights, `settings <hash>` of a processor's fields."""
    if isinstance(loaded, torch.nn.Module):
        return f"weights {model_fingerprint(loaded)[:16]}"
    # Its class name and remote-code map say how it was saved, not what it does.
    fields = {key: value for key, value in loaded.to_dict().items() if key not in ("image_processor_type", "auto_map")}
    return f"settings {hash_parts(json.dumps(fields, sort_keys=True, default=str))[:16]}"


def run_flags(training_args: TrainingArguments, *argument_groups, loaded: dict | None = None) -> dict:
    """The flags that decide what a training run draws and how it updates: `TRAJECTORY_TRAINING_FLAGS`, the number of
    processes, and every flag of the command's own dataclasses (`argument_groups`, e.g. model and data arguments)
    but those that say where data and models are; as JSON values. `loaded` maps a flag that names a model or image
    processor to the one loaded (e.g. the VQ-KD teacher of `--teacher_name_or_path`), recorded by its
    [`content_fingerprint`]: a resumption may find it at another path, but not another one."""
    flags = {name: getattr(training_args, name) for name in TRAJECTORY_TRAINING_FLAGS if hasattr(training_args, name)}
    flags["num_processes"] = training_args.world_size
    for group in argument_groups:
        flags.update(
            {field.name: getattr(group, field.name) for field in dataclasses.fields(group) if _decides_the_run(field.name)}
        )
    flags.update({name: content_fingerprint(value) for name, value in (loaded or {}).items()})
    return json.loads(json.dumps(flags, default=_json_value))


def _checkpoint_json(checkpoint: str | None, name: str) -> dict:
    """The JSON file `name` of `checkpoint` ({} without a checkpoint or the file)."""
    path = None if checkpoint is None else os.path.join(checkpoint, name)
    if path is None or not os.path.isfile(path):
        return {}
    with open(path) as file:
        return json.load(file)


class RunRecordsCallback(TrainerCallback):
    """Writes each checkpoint's `RUN_RECORD` (one of the `MimTrainer`'s `checkpoint_writers`, so a checkpoint pushed
    to the Hub holds it): the run's `flags` and the undecodable training images skipped so far over all processes
    (this launch's, counted by `skipped`, plus those of the checkpoint it `resumed` from). On resumption it warns when
    the run's length changed: the learning-rate schedule is rebuilt for the new length."""

    def __init__(self, trainer, flags: dict | None, skipped, resumed: str | None = None):
        self.trainer, self.flags, self.skipped, self.resumed = trainer, flags, skipped, resumed
        self.skipped_before = _checkpoint_json(resumed, RUN_RECORD).get("train_skipped_images", 0)
        trainer.checkpoint_writers.append(self.write)

    def on_train_begin(self, args, state, control, **kwargs):
        planned = _checkpoint_json(self.resumed, "trainer_state.json").get("max_steps")
        schedule = _json_value(args.lr_scheduler_type)
        if planned and planned != state.max_steps and schedule != "constant" and state.is_world_process_zero:
            logger.warning(
                f"{self.resumed} was planned for {planned} steps and this launch for {state.max_steps}: the "
                f"{schedule} learning-rate schedule (and a warm-up given as a fraction) is rebuilt for "
                "the new length, so its rates from the checkpoint on differ from the original plan's"
            )

    def write(self, folder: str) -> None:
        # Every process saves, so every process takes part in the sum.
        (count,) = self.trainer.summed_over_processes(self.skipped.value)
        if self.trainer.is_world_process_zero():
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, RUN_RECORD), "w") as file:
                json.dump({"flags": self.flags, "train_skipped_images": self.skipped_before + count}, file, indent=2)


def _flag_value(value) -> str:
    return "unset" if value is None else json.dumps(value)


def check_run_flags(checkpoint: str, flags: dict, afresh: str) -> None:
    """A one-line error when this launch's `flags` (`run_flags`) differ from those `checkpoint` was trained with:
    Trainer would resume with the checkpoint's optimiser and schedule and this launch's data, a run that is neither.
    `afresh` says how to start a new run instead."""
    saved = _checkpoint_json(checkpoint, RUN_RECORD).get("flags")
    if saved is None:
        logger.warning(f"{checkpoint} has no {RUN_RECORD} (an older hf_mim, or a copy from the Hub): the flags it was "
                       "trained with cannot be checked; resume with the same ones")  # fmt: skip
        return
    changed = sorted(
        name for name in saved.keys() & flags.keys()
        # An older record's unset default is whatever this launch resolved it to, unless the launch set it.
        if saved[name] != flags[name] and not (saved[name] is None and name in RESOLVED_DEFAULT_FLAGS)
    )
    if not changed:
        return
    differences = ", ".join(
        f"{saved[name]} processes (this launch: {flags[name]}; the launcher's setting)" if name == "num_processes"
        else f"--{name} {_flag_value(saved[name])} (this launch: {_flag_value(flags[name])})"
        for name in changed
    )  # fmt: skip
    raise UsageError(
        f"{checkpoint} was trained with {differences}; a resumed run keeps the flags that decide its data and "
        f"updates: relaunch with the checkpoint's, or {afresh}"
    )


def require_a_full_batch(trainer, training_args: TrainingArguments) -> None:
    """A one-line error, before training, when `--dataloader_drop_last` would drop every batch of some process (a
    map-style training set smaller than one batch per process): the run would train no step, or transformers would
    fail on a loader without batches."""
    dataset = trainer.train_dataset
    if not training_args.dataloader_drop_last or not hasattr(dataset, "__len__"):
        return
    processes, batch = training_args.world_size, training_args.per_device_train_batch_size
    # With split_batches, --per_device_train_batch_size is the batch all processes share.
    split = getattr(training_args.accelerator_config, "split_batches", False)
    if len(dataset) < (1 if split else processes) * batch:
        raise UsageError(
            f"--dataloader_drop_last drops every batch: {len(dataset)} training images do not fill a batch of "
            f"--per_device_train_batch_size {batch} on each of {processes} process(es); lower the batch size, add "
            "images, or leave --dataloader_drop_last off"
        )


def require_an_update(trainer, resumed: str | None = None) -> None:
    """A launch that ran no optimiser step, or (with `--skip_nonfinite_steps`) skipped every one, left the weights as
    they were: it fails instead of saving them as a trained model."""
    skipped, steps = trainer.nonfinite_guard.skipped_steps, trainer.throughput.steps
    if steps == 0:
        why = (
            f"{resumed} had already reached the end of training at this launch's batch size and processes: raise "
            "--max_steps or --num_train_epochs to train on"
            if resumed is not None
            else "check that the training data fill a batch (--per_device_train_batch_size, --dataloader_drop_last)"
        )
        raise UsageError(f"this launch ran no training step (no batch reached the model), so no model was saved: {why}")
    if skipped and skipped >= steps:
        raise FloatingPointError(
            f"every one of the {steps} optimiser steps of this launch had a non-finite loss and was skipped "
            f"(--skip_nonfinite_steps): the weights never changed, so no model was saved; {NONFINITE_ADVICE}"
        )


def require_decoded_images(trainer, skipped, data_flag: str = "--train_dir") -> int:
    """The undecodable images skipped in training, over all processes and their DataLoader workers; a run that
    decoded no image, or fewer than it skipped, trained on next to nothing and fails instead of saving a model
    (naming `data_flag`, where the images came from)."""
    undecodable, decoded = trainer.summed_over_processes(skipped.value, trainer.throughput.samples)
    if undecodable and (decoded == 0 or undecodable > decoded):
        raise UsageError(
            f"{undecodable} training images could not be decoded and {decoded} could (see the warnings above for "
            f"the files); no model was saved: point {data_flag} at your images, or fix or remove the broken files"
        )
    return undecodable


@contextlib.contextmanager
def empty_stream_errors(skipped, eval_skipped=None):
    """A one-line error for a `--streaming` split that yields no batch at all: its undecodable images are filtered out
    of the stream, and accelerate then fails on the first batch with a message of its own."""
    try:
        yield
    except ValueError as error:
        if not str(error).startswith("Batch does not contain any data"):
            raise
        counts = f"{skipped.value} training and {0 if eval_skipped is None else eval_skipped.value} validation images"
        raise UsageError(
            f"a streamed split yielded no decodable image ({counts} were undecodable, see the warnings above for the "
            "files): point --train_dir / --validation_dir or --dataset_name at your images"
        ) from error


def train_and_evaluate(
    trainer,
    training_args: TrainingArguments,
    skipped,
    after_save=None,
    dataset_name: str | None = None,
    model_card: bool = True,
    train_dir: str | None = None,
    flags: dict | None = None,
    eval_skipped=None,
) -> dict[str, float]:
    """The end of every hf_mim training script: train (resuming if asked), save, evaluate, write the card.

    `after_save` runs on the main process after the model is saved (e.g. to add the tokenizer's processor);
    `skipped` and `eval_skipped` are the `SkippedImageCounter`s of the training and evaluation datasets; `model_card=False` for outputs that are not hf_mim
    families (a stock transformers classifier), which get no hf_mim card; the card names `dataset_name` when it is
    a Hub dataset, else the `train_dir` folder and its image count; `flags` (`run_flags`) are recorded in every
    checkpoint (`RunRecordsCallback`), and a resumed run must keep them. Returns train and eval metrics.
    """
    metrics: dict[str, float] = {}
    trainer.eval_skipped_images = eval_skipped
    if training_args.do_train:
        checkpoint = find_checkpoint(training_args, trainer.model, flags)
        require_a_full_batch(trainer, training_args)
        data_flag = "--dataset_name" if dataset_name and not train_dir else "--train_dir"
        trainer.skipped_images, trainer.data_flag = skipped, data_flag
        records = RunRecordsCallback(trainer, flags, skipped, resumed=checkpoint)
        trainer.add_callback(records)
        if checkpoint is None and getattr(training_args, "overwrite_output_dir", False) and training_args.should_save:
            clear_earlier_run(training_args)
        with empty_stream_errors(skipped, eval_skipped):
            result = trainer.train(resume_from_checkpoint=checkpoint)
        undecodable = records.skipped_before + require_decoded_images(trainer, skipped, data_flag)
        require_an_update(trainer, checkpoint)
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
        before = 0 if eval_skipped is None else eval_skipped.value
        with empty_stream_errors(skipped, eval_skipped):
            eval_metrics = trainer.evaluate()
        if eval_skipped is not None:
            # This evaluation's, not those run during training.
            (eval_metrics["eval_skipped_images"],) = trainer.summed_over_processes(eval_skipped.value - before)
        if "eval_loss" not in eval_metrics:
            # No batch reached the model: every validation image was undecodable (the warnings above name them).
            raise UsageError(NO_VALIDATION_IMAGE)
        evaluated = [entry for entry in trainer.state.log_history if "eval_accuracy" in entry]
        if len(evaluated) > 1:
            # BEiT's fine-tuning reports the best accuracy over its evaluations; the last one is reported beside it.
            best = max(evaluated, key=lambda entry: entry["eval_accuracy"])
            eval_metrics.update(eval_best_accuracy=best["eval_accuracy"], eval_best_accuracy_step=best["step"])
        metrics.update(eval_metrics)
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
    if training_args.do_train and model_card:
        # hf_mim's card (MimTrainer.create_model_card), pushed with everything else under --push_to_hub.
        card = {"dataset_tags": hub_dataset_id(dataset_name)}
        num_images = len(trainer.train_dataset) if hasattr(trainer.train_dataset, "__len__") else None
        trainer.training_data = describe_training_data(train_dir, num_images)
        if training_args.push_to_hub:
            with hub_request_errors(default_repo_id(training_args), token_flag="--hub_token"):
                trainer.push_to_hub(**card)
        else:
            trainer.create_model_card(**card)
    for name in ("train_skipped_images", "eval_skipped_images"):
        # The counts are over all processes: said once, by the main one.
        if metrics.get(name) and trainer.is_world_process_zero():
            logger.warning(f"{name} = {metrics[name]}: undecodable images were skipped (the warnings above name them)")
    return metrics


__all__ = [
    "EARLIER_RUN_FILES",
    "RUN_RECORD",
    "RunRecordsCallback",
    "TRAJECTORY_TRAINING_FLAGS",
    "check_checkpoint_weights",
    "check_resumption_flags",
    "check_run_flags",
    "check_tokenizer_weights",
    "clear_earlier_run",
    "content_fingerprint",
    "earlier_checkpoints",
    "empty_stream_errors",
    "find_checkpoint",
    "require_a_full_batch",
    "require_action",
    "require_an_update",
    "require_decoded_images",
    "require_no_earlier_model",
    "require_steps_when_streaming",
    "require_weights_to_evaluate",
    "resumption",
    "run_flags",
    "setup_logging",
    "train_and_evaluate",
]
