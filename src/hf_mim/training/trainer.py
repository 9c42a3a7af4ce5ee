"""A `Trainer` for hf_mim models: BEiT parameter groups, per-step model metrics, non-finite loss guard."""

import logging
import math
import os
from collections.abc import Callable

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils.hub import hf_api

from ..arguments import flags_set
from ..checkpoint_folder import checkpoint_weight_names
from ..data.collator import decodable
from ..errors import UsageError
from ..hub.callbacks import HubFilesCallback
from ..hub.cards import write_model_card
from ..hub.push import default_repo_id, hub_request_errors, prepare_repo
from .arguments import flag_value
from .budget import add_time_budget
from .optim import build_param_groups

logger = logging.getLogger(__name__)

NONFINITE_ADVICE = (
    "lower the learning rate, enable gradient clipping (--max_grad_norm), use bf16 instead of fp16, or pass "
    "--skip_nonfinite_steps to skip such steps"
)
# Every validation image was undecodable (the warnings name them).
NO_VALIDATION_IMAGE = (
    "no validation image could be decoded, so there is nothing to evaluate: point --validation_dir (or "
    "--train_val_split) at your images, or fix or remove the broken files"
)


class DatasetEpochCallback(TrainerCallback):
    """Tells a training dataset with `set_epoch` (e.g. `SeededTransformedDataset`) which epoch begins.

    accelerate forwards `set_epoch` to the dataset only when no sampler takes it (one process), so a multi-process
    run would draw epoch 0's augmentations every epoch; this callback does it on every rank, also on resumption.
    """

    def on_epoch_begin(self, args, state, control, train_dataloader=None, **kwargs):
        dataset = getattr(train_dataloader, "dataset", None)
        if hasattr(dataset, "set_epoch"):
            # state.epoch is the fraction of epochs done: an integer here, or a checkpoint's value on resumption.
            dataset.set_epoch(math.floor(state.epoch or 0))


class NonFiniteStepGuard(TrainerCallback):
    """Drops the update of an optimiser step whose loss was non-finite on any process, and counts such steps.

    `MimTrainer.compute_loss` flags the step; here, just before `optimizer.step()`, the gradients of a flagged step
    are set to None, so the optimiser leaves every weight and its state (moments, weight decay) untouched. The
    learning-rate schedule still advances: a skipped step counts as a step.
    """

    def __init__(self):
        self.flagged = False
        self.skipped_steps = 0

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self.flagged:
            optimizer.zero_grad(set_to_none=True)
            self.flagged = False
            self.skipped_steps += 1


class ThroughputCounter(TrainerCallback):
    """Counts the optimiser steps and training samples a launch actually processed, for throughput that a time
    budget or a resumption does not inflate (Trainer's figures assume the planned `max_steps` of full batches)."""

    def __init__(self):
        self.steps = self.samples = self.first_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        # A resumed run begins at its checkpoint's step.
        self.steps, self.samples, self.first_step = 0, 0, state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


class NoExtraFinalCheckpoint(TrainerCallback):
    """Drops the checkpoint `Trainer` adds at the last step of a `save_strategy="steps"` run when `save_steps` did
    not ask for it: the scripts save the final model into `output_dir` right after, so that checkpoint only repeated
    it with the optimiser state (a 2-step run of the default dVAE wrote 1.5 GB instead of 390 MB). To continue a
    finished run later from its optimiser state, pick a `save_steps` that divides `max_steps`."""

    def on_step_end(self, args, state, control, **kwargs):
        last = state.global_step >= state.max_steps
        if last and control.should_save and state.save_steps > 0 and state.global_step % state.save_steps != 0:
            control.should_save = False
        return control


def batch_size(inputs: dict) -> int:
    """The number of examples in a collated batch (the leading dimension of its tensors)."""
    return next(value.shape[0] for value in inputs.values() if isinstance(value, torch.Tensor))


# Where an evaluation batch of several processes lists which of its sampled examples were decodable.
DECODED = "decoded"


class DecodedPositionsCollator:
    """An evaluation collator for several processes: its batch also holds, under `DECODED` (a tuple of bools, which
    stays on the host), whether each sampled example was decodable, so that every process gathers its predictions
    in the sampled positions: equal shapes on every process, and the padding accelerate drops from the last batch
    (by position) is padding."""

    def __init__(self, collator: Callable[[list], dict]):
        self.collator = collator

    def __call__(self, examples: list) -> dict:
        return {**self.collator(examples), DECODED: tuple(decodable(example) for example in examples)}


def in_sampled_positions(values, rows: list[int], size: int, fill: float):
    """`values` (a tensor whose leading rows are those of the examples `rows`, or a tuple of such) spread over a
    batch of `size` sampled examples, `fill` in the rows of the others."""
    if isinstance(values, (tuple, list)):
        return type(values)(in_sampled_positions(value, rows, size, fill) for value in values)
    padded = values.new_full((size, *values.shape[1:]), fill)
    if rows:
        # An index tensor copied to the device, not a boolean mask (which reads its count on the host).
        padded[torch.tensor(rows, device=values.device)] = values[: len(rows)]
    return padded


def _count_nonfinite(loss: torch.Tensor, counted: torch.Tensor | None) -> torch.Tensor:
    """`counted` plus one if `loss` is non-finite, on the loss's device (no host read)."""
    nonfinite = (~torch.isfinite(loss.detach())).any().int()
    return nonfinite if counted is None else counted + nonfinite


class MimTrainer(Trainer):
    """`Trainer` that logs every scalar a model returns besides its loss (masked accuracy, loss terms, codebook
    usage) averaged over the logging window and across processes, and builds BEiT's optimiser groups.

    With `push_to_hub`, every push (also the intermediate ones of `hub_strategy="every_save"`) loads with
    `trust_remote_code=True` (a `HubFilesCallback` is added unless one is passed), `hub_revision` branches are
    created, and the card is hf_mim's (`hf_mim.hub.write_model_card`).

    A training step makes no host synchronisation: a non-finite training loss is counted on the device and raises
    `FloatingPointError` at the next logging step, checkpoint or end of training, whichever comes first, before
    anything is saved. With `skip_nonfinite_steps` the decision is needed before each optimiser step, which costs
    one synchronisation per step. `args.max_train_seconds` (hf_mim's training arguments) adds a time budget.
    `checkpoint_writers` (callables taking a checkpoint folder) run on every process before Trainer saves each
    checkpoint, so what they write there is in it when Trainer pushes it to the Hub (`hub_strategy="checkpoint"`),
    which it does before its `on_save` callbacks run.

    Args:
        layer_decay (`float`, *optional*):
            Layer-wise learning-rate decay for fine-tuning (e.g. 0.65); `None` for pre-training.
        skip_nonfinite_steps (`bool`, *optional*):
            On a non-finite training loss, log it with its step and skip that optimiser step (all processes agree)
            instead of raising `FloatingPointError`; the count is `nonfinite_guard.skipped_steps`. Defaults to
            `args.skip_nonfinite_steps` where the arguments have it, else `False`.
    """

    def __init__(self, *args, layer_decay: float | None = None, skip_nonfinite_steps: bool | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if not any(isinstance(callback, HubFilesCallback) for callback in self.callback_handler.callbacks):
            self.add_callback(HubFilesCallback())
        self.add_callback(DatasetEpochCallback())
        if skip_nonfinite_steps is None:
            skip_nonfinite_steps = getattr(self.args, "skip_nonfinite_steps", False)
        self.skip_nonfinite_steps = skip_nonfinite_steps
        self.nonfinite_guard = NonFiniteStepGuard()
        self.add_callback(self.nonfinite_guard)
        self.throughput = ThroughputCounter()
        self.add_callback(self.throughput)
        self.add_callback(NoExtraFinalCheckpoint())
        if getattr(self.args, "max_train_seconds", None) is not None:
            add_time_budget(self, self.args.max_train_seconds)
        self.layer_decay = layer_decay
        self.checkpoint_writers: list[Callable[[str], None]] = []
        # The card's description of training images that are not a Hub dataset (`hub.cards.describe_training_data`).
        self.training_data: str | None = None
        self._metric_sums: dict[str, dict[str, torch.Tensor]] = {"train": {}, "eval": {}}
        self._metric_weights = {"train": 0, "eval": 0}
        # Non-finite training losses since the last check, counted on the device; and the step of that check.
        self._nonfinite_losses: torch.Tensor | None = None
        self._nonfinite_eval_losses: torch.Tensor | None = None
        self._nonfinite_checked_step = 0
        # Set while a process whose batch was all undecodable takes part in DDP's all-reduce (`training_step`).
        self.stand_in = False
        self._stand_in_index = {"train": 0, "eval": 0}
        # The training and evaluation sets' `SkippedImageCounter`s and the flag naming the training images, where the
        # script gives them (`workflow.train_and_evaluate`).
        self.skipped_images = None
        self.eval_skipped_images = None
        self.data_flag = "--train_dir"
        # The evaluation set being evaluated, and its loss summed over its examples with their count.
        self._evaluated_dataset = None
        self._eval_loss_sum: torch.Tensor | None = None
        self._eval_examples = 0

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if not self._load_renamed_weights(resume_from_checkpoint, self.model if model is None else model):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self):
        if not self._load_renamed_weights(self.state.best_model_checkpoint, self.model):
            super()._load_best_model()

    def _load_renamed_weights(self, folder: str, model) -> bool:
        """Load a checkpoint whose tensors are saved under other names than `model`'s, as `from_pretrained` does.

        transformers 5 saves a stock BEiT's layers (e.g. a fine-tuned classifier) under their version-4 names and
        renames them only in `from_pretrained`; Trainer resumes (and loads the best model) with
        `load_state_dict(strict=False)`, which then loads nothing and only warns, so training would go on from the
        weights of a new run. Returns False, having done nothing, when the names match or the weights are not plain
        safetensors (Trainer loads them).
        """
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return False
        names = checkpoint_weight_names(folder)
        if names is None or names == set(model.state_dict()):
            return False
        loaded, info = type(model).from_pretrained(folder, config=model.config, output_loading_info=True)
        if info["missing_keys"] or info["unexpected_keys"]:
            unfit = sorted(info["missing_keys"]) or sorted(info["unexpected_keys"])
            raise UsageError(
                f"The weights in {folder} do not fit the model being trained ({len(unfit)} tensors such as "
                f"{unfit[0]!r} have no counterpart): resume with the model and flags that checkpoint was trained "
                "with, or start anew in another --output_dir"
            )
        model.load_state_dict(loaded.state_dict())
        return True

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        # Trainer commits to `hub_revision` without creating it, and the Hub refuses commits to a missing branch.
        if not self.is_world_process_zero():
            return
        repo_id = default_repo_id(self.args)
        with hub_request_errors(repo_id, token_flag="--hub_token"):
            self.hub_model_id = prepare_repo(
                hf_api(),
                repo_id,
                private=private if private is not None else self.args.hub_private_repo,
                revision=self.args.hub_revision,
                token=token if token is not None else self.args.hub_token,
                private_flag="--hub_private_repo",
            )
        self.push_in_progress = None

    def create_model_card(
        self,
        language=None,
        license=None,
        tags=None,
        model_name=None,
        finetuned_from=None,
        tasks=None,
        dataset_tags=None,
        dataset=None,
        dataset_args=None,
        results=None,
    ) -> None:
        """Write hf_mim's model card to `output_dir/README.md` (what `push_to_hub` uploads).

        Replaces Trainer's card, which calls a model trained from scratch "a fine-tuned version of []" and has no
        usage for remote code. `dataset_tags` (or `dataset`) are Hub dataset ids, `finetuned_from` the base model,
        `results` a list of `hf_mim.hub.CardResult`; `language`, `tasks` and `dataset_args` are not used.
        """
        if not self.is_world_process_zero():
            return
        write_model_card(
            self.args.output_dir,
            repo_id=getattr(self, "hub_model_id", None) or self.args.hub_model_id,
            model_name=model_name,
            datasets=dataset_tags or dataset,
            license=license,
            base_model=finetuned_from,
            tags=tags,
            results=results,
            training_args=self.args,
            trainer_state=self.state,
            training_data=self.training_data,
        )

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            groups = build_param_groups(
                opt_model, self.args.weight_decay, self.args.learning_rate, layer_decay=self.layer_decay
            )
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.is_world_process_zero():
            self._warn_of_steps_beyond_the_run(num_training_steps)
        return super().create_scheduler(num_training_steps, optimizer)

    def _warn_of_steps_beyond_the_run(self, num_training_steps: int) -> None:
        """Warnings for step counts longer than the run (allowed: a short trial of a long recipe), which would
        otherwise change what the run does without a word."""
        warmup = self.args.get_warmup_steps(num_training_steps)
        if warmup > num_training_steps:
            logger.warning(
                "--warmup_steps %g is %d steps, longer than the run's %d: the learning rate never reaches "
                "--learning_rate; lower it (or give it as a fraction of the run, e.g. 0.1)",
                self.args.warmup_steps, warmup, num_training_steps,
            )  # fmt: skip
        missed = {"eval": "no evaluation runs during training", "save": "no checkpoint is saved during training",
                  "logging": "no training loss is logged"}  # fmt: skip
        for name, consequence in missed.items():
            interval = getattr(self.args, f"{name}_steps")
            if flag_value(getattr(self.args, f"{name}_strategy")) != "steps" or not interval:
                continue
            if name != "eval" and not flags_set(self.args, [f"{name}_steps"]):
                # transformers' default interval (500), not asked for: a short run is not warned of it.
                continue
            # A fraction below 1 is a share of the run, as Trainer reads it.
            steps = math.ceil(interval * num_training_steps) if interval < 1 else int(interval)
            if steps > num_training_steps:
                logger.warning(
                    "--%s_steps %g is beyond the run's %d steps: %s; lower it (or give it as a fraction of the run)",
                    name, interval, num_training_steps, consequence,
                )  # fmt: skip

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not inputs:
            # The collator returns {} when every image of a batch was undecodable (already logged and counted).
            logger.warning(f"Skipping a batch of step {self.state.global_step + 1}: every image of it was undecodable")
            if self.accelerator.num_processes > 1:
                # The other processes run backward on their batches, whose gradients DDP all-reduces with this
                # one's: this process takes part with a decodable example whose loss counts zero, so it adds zero
                # gradients (a no-op step here would leave the others waiting in the all-reduce).
                self.stand_in = True
                try:
                    super().training_step(model, self._stand_in_batch("train"), num_items_in_batch)
                finally:
                    self.stand_in = False
            return torch.zeros((), device=self.args.device)
        self.throughput.samples += batch_size(inputs)
        return super().training_step(model, inputs, num_items_in_batch)

    def _stand_in_batch(self, split: str) -> dict:
        """A batch of one decodable example of the `split` ("train" or "eval") being run, for a process whose batch
        had none (see `training_step` and `prediction_step`)."""
        training = split == "train"
        dataset = self.train_dataset if training else self._evaluated_dataset
        skipped = self.skipped_images if training else self.eval_skipped_images
        count = len(dataset) if hasattr(dataset, "__len__") else 0  # a stream filters undecodable images out itself
        for offset in range(count):
            index = (self._stand_in_index[split] + offset) % count
            batch = self.data_collator([dataset[index]])
            if not batch and skipped is not None:
                # Counted again by reading it here: it was counted when its own batch was drawn.
                skipped.increment(-1)
            if batch:
                self._stand_in_index[split] = index
                return batch
        if not training:
            raise UsageError(NO_VALIDATION_IMAGE)
        raise UsageError(
            f"no training image could be decoded (the warnings above name the files): point {self.data_flag} at your "
            "images, or fix or remove the broken files"
        )

    def get_eval_dataloader(self, eval_dataset=None):
        dataset = self.eval_dataset[eval_dataset] if isinstance(eval_dataset, str) else eval_dataset
        dataset = self.eval_dataset if dataset is None else dataset
        return self._with_decoded_positions(dataset, lambda: super(MimTrainer, self).get_eval_dataloader(eval_dataset))

    def get_test_dataloader(self, test_dataset):
        return self._with_decoded_positions(
            test_dataset, lambda: super(MimTrainer, self).get_test_dataloader(test_dataset)
        )

    def _with_decoded_positions(self, dataset, make_dataloader: Callable[[], object]):
        """`make_dataloader()` for evaluating `dataset`, whose batches say which sampled examples were decodable where
        several processes each evaluate their share of a batch (see `prediction_step`)."""
        self._evaluated_dataset = dataset
        # A stream filters undecodable images out itself and is dispatched (one process reads, the batches are
        # split and concatenated by accelerate): no positions to keep, and a tuple would not concatenate.
        sharded = hasattr(dataset, "__len__") and not isinstance(dataset, torch.utils.data.IterableDataset)
        if self.accelerator.num_processes == 1 or not sharded or self.accelerator.dispatch_batches:
            return make_dataloader()
        collator = self.data_collator
        self.data_collator = DecodedPositionsCollator(collator)
        try:
            return make_dataloader()
        finally:
            self.data_collator = collator

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = dict(inputs)
        decoded = inputs.pop(DECODED, None)
        if decoded is None:
            # One process, or a stream (no undecodable image): a batch without a decodable image has nothing to add.
            if not inputs:
                return None, None, None
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        # Several processes gather every batch's loss (and predictions) together, so each process takes part in
        # every gather, with its predictions in their sampled positions and padding for the images not evaluated.
        first_repeat = self._first_repeat(len(decoded))
        rows = [index for index in range(first_repeat) if decoded[index]]
        repeated_undecodable = decoded[first_repeat:].count(False)
        if repeated_undecodable and self.eval_skipped_images is not None:
            # Counted again by the repeat: each undecodable image counts once.
            self.eval_skipped_images.increment(-repeated_undecodable)
        if inputs and len(rows) < batch_size(inputs):
            # The batch holds the decodable examples in sampled order: the repeats left out are its last rows.
            inputs = {key: value[: len(rows)] if isinstance(value, torch.Tensor) else value
                      for key, value in inputs.items()}  # fmt: skip
        if rows:
            loss, logits, labels = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        elif prediction_loss_only:
            loss, logits, labels = None, None, None
        else:
            # For the shapes of the predictions only: every row becomes padding below.
            self.stand_in = True
            try:
                loss, logits, labels = super().prediction_step(
                    model, self._stand_in_batch("eval"), prediction_loss_only, ignore_keys=ignore_keys
                )
            finally:
                self.stand_in = False
            loss = None
        if loss is None:
            # Gathered beside the others' losses; `evaluation_loop` reports the loss of the examples evaluated.
            loss = torch.full((), float("nan"), device=self.args.device)
        if logits is not None:
            logits = in_sampled_positions(logits, rows, len(decoded), 0)
        if labels is not None:
            # -100: Trainer's padding index, which compute_metrics leaves out.
            labels = in_sampled_positions(labels, rows, len(decoded), -100)
        return loss, logits, labels

    def _first_repeat(self, size: int) -> int:
        """The position, in this process's evaluation batch of `size` examples, from which it repeats the first
        examples of the set: accelerate fills every process's last batch so, and `gather_for_metrics` drops them."""
        state = self.accelerator.gradient_state
        if not (state.end_of_dataloader and state.remainder > 0):
            return size
        # The batches gather in process order: position i of this process is sample rank * size + i.
        return min(size, max(0, state.remainder - self.accelerator.process_index * size))

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix: str = "eval"):  # fmt: skip
        self._eval_loss_sum, self._eval_examples = None, 0
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        # Trainer weighs each batch's loss by the full batch size, and under several processes gathers a placeholder
        # from a process whose batch had no decodable image: the loss is the mean over the examples evaluated.
        loss_sum = self._eval_loss_sum
        if loss_sum is None:
            loss_sum = torch.zeros((), device=self.args.device)
        totals = torch.stack([loss_sum.float(), loss_sum.new_tensor(float(self._eval_examples), dtype=torch.float)])
        if self.accelerator.num_processes > 1:
            totals = self.accelerator.reduce(totals.to(self.accelerator.device), reduction="sum")
        loss_sum, examples = totals.tolist()
        key = f"{metric_key_prefix}_loss"
        if examples == 0:
            # Nothing was evaluated (every image undecodable): no loss rather than a NaN one.
            output.metrics.pop(key, None)
        else:
            output.metrics[key] = loss_sum / examples
        return output

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Exact mask counts make the model's gathers static: no device synchronisation per step, one compiled graph.
        exact_counts = getattr(self.data_collator, "exact_counts", None)
        if exact_counts is not None:
            inputs = {**exact_counts(), **inputs}
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if self.stand_in and not model.training:
            # Evaluated for the shapes of its predictions only (`prediction_step`).
            return (loss, outputs) if return_outputs else loss
        if self.stand_in:
            # The example stands in for a batch that had none: zero gradients and metrics of weight zero, but the
            # same loss check as every process makes (with --skip_nonfinite_steps a reduction they all join).
            self._check_training_loss(loss)
            self._accumulate_metrics("train", outputs, weight=0)
            loss = loss * 0.0
            return (loss, outputs) if return_outputs else loss
        if not model.training:
            # Checked once the evaluation ends, on every process together.
            self._nonfinite_eval_losses = _count_nonfinite(loss, self._nonfinite_eval_losses)
            examples = batch_size(inputs)
            weighted = loss.detach().float() * examples
            self._eval_loss_sum = weighted if self._eval_loss_sum is None else self._eval_loss_sum + weighted
            self._eval_examples += examples
            # Weighed by its examples, as the loss: a short last batch (or a partly decodable one) is not worth a
            # full one.
            self._accumulate_metrics("eval", outputs, weight=examples)
        else:
            self._check_training_loss(loss)
            self._accumulate_metrics("train", outputs)
        return (loss, outputs) if return_outputs else loss

    def _check_training_loss(self, loss: torch.Tensor) -> None:
        if self.skip_nonfinite_steps:
            self._flag_nonfinite_step(loss)
        else:
            self.count_nonfinite_loss(loss)

    def count_nonfinite_loss(self, loss: torch.Tensor) -> None:
        """Count a non-finite training loss on its device, for `check_nonfinite_losses`: no host sync per step."""
        self._nonfinite_losses = _count_nonfinite(loss, self._nonfinite_losses)

    def _flag_nonfinite_step(self, loss: torch.Tensor) -> None:
        """`--skip_nonfinite_steps`: flag this training step for `NonFiniteStepGuard` to skip if its loss is
        non-finite on any process (a host read per step: the decision comes before the optimiser step)."""
        nonfinite = (~torch.isfinite(loss.detach())).any().float()
        if self.accelerator.num_processes > 1:
            # Every process must take the same decision, or their optimiser steps (and weights) diverge.
            nonfinite = self.accelerator.reduce(nonfinite, reduction="sum")
        if nonfinite.item() == 0:
            return
        # global_step counts the steps done: this is the next one, numbered as the FloatingPointError numbers them.
        step = self.state.global_step + 1
        message = f"Non-finite loss ({loss.item()}) on {int(nonfinite.item())} process(es) at step {step}"
        self.nonfinite_guard.flagged = True
        logger.warning(f"{message}; skipping this optimiser step ({self.nonfinite_guard.skipped_steps + 1} so far)")

    def nonfinite_loss_count(self) -> torch.Tensor | None:
        """The non-finite training losses since the last call, summed over processes, on the device (no host sync);
        `None` in a single process that saw none. Every rank must call it (it reduces across processes)."""
        counted, self._nonfinite_losses = self._nonfinite_losses, None
        if self.accelerator.num_processes == 1:
            return counted
        counted = torch.zeros((), device=self.args.device) if counted is None else counted.float()
        return self.accelerator.reduce(counted.to(self.accelerator.device), reduction="sum")

    def check_nonfinite_losses(self) -> None:
        """Raise `FloatingPointError` if a training loss since the last check was non-finite on any process.

        Every rank must call it: `log`, checkpoint saving and the end of `train` do.
        """
        first = max(self._nonfinite_checked_step, self.throughput.first_step) + 1
        self._nonfinite_checked_step = self.state.global_step
        counted = self.nonfinite_loss_count()
        if counted is not None and counted.item() > 0:
            raise FloatingPointError(
                f"Non-finite training loss in {int(counted.item())} step(s) (summed over processes) between steps "
                f"{first} and {self.state.global_step}; {NONFINITE_ADVICE}"
            )

    def _save_checkpoint(self, model, trial):
        # Weights after a non-finite loss are not worth a checkpoint (or a resumption from it).
        self.check_nonfinite_losses()
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        for write in self.checkpoint_writers:
            write(folder)
        return super()._save_checkpoint(model, trial)

    def _accumulate_metrics(self, split: str, outputs, weight: int = 1) -> None:
        """Add the scalars of `outputs` to the window of `split`, `weight` times: a training step counts once, an
        evaluation batch as many times as it has examples."""
        sums = self._metric_sums[split]
        for key, value in outputs.items():
            if key != "loss" and isinstance(value, torch.Tensor) and value.ndim == 0:
                # Weight zero adds zeros, not 0 x a non-finite value.
                value = weight * value.detach().float() if weight else torch.zeros_like(value, dtype=torch.float)
                sums[key] = sums.get(key, 0.0) + value
        self._metric_weights[split] += weight

    def window_totals(self, split: str) -> tuple[list[str], torch.Tensor | None]:
        """The names of the scalars accumulated since the last log and, on their device, their weighted sums followed
        by the sum of the weights, summed over processes; the window restarts. Every rank must call it."""
        sums, weight = self._metric_sums[split], self._metric_weights[split]
        self._metric_sums[split], self._metric_weights[split] = {}, 0
        if not sums:
            return [], None
        names = sorted(sums)
        totals = torch.stack([sums[name] for name in names])
        # The weight joins the sums on their device (a CPU scalar beside CUDA sums cannot be stacked).
        totals = torch.cat([totals, totals.new_tensor([float(weight)])])
        if self.accelerator.num_processes > 1:
            totals = self.accelerator.reduce(totals.to(self.accelerator.device), reduction="sum")
        return names, totals

    def _pop_metrics(self, split: str) -> dict[str, float]:
        """Window means of the accumulated scalars, averaged over processes; every rank must call it."""
        names, totals = self.window_totals(split)
        if totals is None:
            return {}
        *sums, weight = totals.tolist()
        # No step of the window had a decodable batch anywhere: nothing to average.
        return {} if weight == 0 else {name: value / weight for name, value in zip(names, sums)}

    def summed_over_processes(self, *counts: int) -> list[int]:
        """`counts` of this process summed over the processes of the launch (one reduction, at the end of a phase;
        every rank must call it). In int64: float32 counts are rounded above 2**24 (ImageNet for 14 epochs)."""
        totals = torch.tensor([int(count) for count in counts], dtype=torch.int64, device=self.args.device)
        if self.accelerator.num_processes > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        return totals.tolist()

    def _pop_throughput(self, logs: dict[str, float]) -> None:
        """Trainer's final speed metrics, recomputed from what this launch processed (every rank calls it)."""
        (samples,) = self.summed_over_processes(self.throughput.samples)
        runtime = max(logs["train_runtime"], 1e-9)
        logs["train_samples"] = samples
        logs["train_steps"] = self.throughput.steps
        logs["train_samples_per_second"] = round(logs["train_samples"] / runtime, 3)
        logs["train_steps_per_second"] = round(self.throughput.steps / runtime, 3)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "train_runtime" in logs:
            # The end of training: a non-finite loss after the last log is reported before the model is saved.
            self.check_nonfinite_losses()
            self._pop_throughput(logs)
        if "loss" in logs:
            self.check_nonfinite_losses()
            logs.update(self._pop_metrics("train"))
        prefixes = [key[: -len("loss")] for key in logs if key.endswith("_loss") and key.startswith(("eval", "test"))]
        if prefixes:
            logs.update({f"{prefixes[0]}{name}": value for name, value in self._pop_metrics("eval").items()})
        super().log(logs, start_time)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        self._metric_sums["eval"], self._metric_weights["eval"] = {}, 0
        self._nonfinite_eval_losses = None
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        counted = self._nonfinite_eval_losses
        counted = torch.zeros((), device=self.args.device) if counted is None else counted.float()
        if self.accelerator.num_processes > 1:
            # Every process raises together; one raising alone would leave the others waiting in a collective.
            counted = self.accelerator.reduce(counted.to(self.accelerator.device), reduction="sum")
        if counted.item() > 0:
            raise FloatingPointError(
                f"Non-finite loss in {int(counted.item())} evaluation batch(es) (summed over processes) at step "
                f"{self.state.global_step}: the weights diverged ({NONFINITE_ADVICE}), or evaluation images decode "
                "to non-finite pixels"
            )
        wanted = self.args.metric_for_best_model
        if wanted is not None and metric_key_prefix == "eval" and self.is_in_train:
            # Trainer looks the metric up right after this, with a KeyError traceback mid-run when it is missing.
            key = wanted if wanted.startswith("eval_") else f"eval_{wanted}"
            if key not in metrics:
                names = sorted(name.removeprefix("eval_") for name in metrics)
                raise UsageError(
                    f"--metric_for_best_model {wanted}: the evaluation reports no {key}; pass one of {names}"
                )
        return metrics


__all__ = [
    "DatasetEpochCallback",
    "DecodedPositionsCollator",
    "MimTrainer",
    "NoExtraFinalCheckpoint",
    "NonFiniteStepGuard",
    "ThroughputCounter",
    "batch_size",
    "in_sampled_positions",
]
