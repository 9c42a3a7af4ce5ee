"""Stop training after a wall-clock budget, so that methods compared "for the same CPU budget" get the same time."""

import time

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from ..models.distributed import all_reduce_, is_distributed, world


class TimeBudgetCallback(TrainerCallback):
    """Ends training at the first step that finishes `max_train_seconds` or more after training began.

    The learning-rate schedule still follows `max_steps`; pick a schedule that is sensible when cut short (e.g.
    `constant_with_warmup`) or a `max_steps` the budget reaches. Schedules of a method (the dVAE's temperature
    and KL ramp) read `training_progress`, which counts the budget. The budget is per launch: a resumed run gets a
    new one and its budget-driven schedules start over, so resume budgeted runs with a `max_steps` they reach.
    Each process times its own budget, and under several processes every one stops at the same step, the first
    check at which any one is past it: a process stopping a step before another would wait in a collective the other
    never enters. Agreeing takes an all-reduce, which waits for the device, so the processes check about once every
    `check_interval` seconds, not every step: each check also agrees on the step of the next one, from their mean
    seconds per step, so they may stop up to that long after the budget.
    """

    def __init__(self, max_train_seconds: float, check_interval: float = 1.0):
        if max_train_seconds <= 0:
            raise ValueError(f"max_train_seconds must be positive, got {max_train_seconds}")
        self.max_train_seconds = max_train_seconds
        self.check_interval = check_interval
        self.start = None
        self.next_check = self.checked_step = 0
        self.checked_at = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = self.checked_at = time.monotonic()
        self.next_check, self.checked_step = state.global_step + 1, state.global_step

    def elapsed_fraction(self) -> float:
        """The fraction of the budget spent so far (0 before training begins)."""
        return 0.0 if self.start is None else (time.monotonic() - self.start) / self.max_train_seconds

    def on_step_end(self, args, state, control, **kwargs):
        over = self.elapsed_fraction() >= 1.0
        if is_distributed():
            if state.global_step < self.next_check:
                return control
            now, step = time.monotonic(), state.global_step
            seconds_per_step = (now - self.checked_at) / max(step - self.checked_step, 1)
            shared = torch.tensor([float(over), seconds_per_step / world()[1]], device=args.device)
            all_reduce_(shared)
            processes_over, mean_seconds_per_step = shared.tolist()
            over = processes_over > 0
            self.checked_at, self.checked_step = now, step
            # Steps of under a millisecond are timer noise: at most a thousand steps per interval between checks.
            self.next_check = step + max(1, round(self.check_interval / max(mean_seconds_per_step, 1e-3)))
        if over:
            control.should_training_stop = True
        return control


class BudgetProgressCallback(ProgressCallback):
    """`ProgressCallback` whose bar counts the seconds of a time budget, not the steps of a `max_steps` that the
    budget is there to cut short (a 100,000-step bar with a 200-hour estimate for a 10-minute run); the steps done
    show beside it."""

    def __init__(self, budget: TimeBudgetCallback):
        super().__init__()
        self.budget = budget

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.training_bar = tqdm(total=int(self.budget.max_train_seconds), unit="s", desc="time budget", dynamic_ncols=True)
        self.current_step = 0

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            elapsed = min(int(self.budget.elapsed_fraction() * self.budget.max_train_seconds), self.training_bar.total)
            self.training_bar.update(elapsed - self.training_bar.n)
            self.training_bar.set_postfix(step=state.global_step, refresh=False)
            self.current_step = state.global_step


def add_time_budget(trainer, max_train_seconds: float) -> TimeBudgetCallback:
    """Stop `trainer` after `max_train_seconds`, with a progress bar over the budget instead of over `max_steps`."""
    budget = TimeBudgetCallback(max_train_seconds)
    trainer.add_callback(budget)
    if any(type(callback) is ProgressCallback for callback in trainer.callback_handler.callbacks):
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(BudgetProgressCallback(budget))
    return budget


def training_progress(trainer) -> float:
    """The fraction of `trainer`'s run done: of `max_steps`, or of its wall-clock budget when that ends it first.

    A budgeted run sets `max_steps` far beyond what the budget reaches, so a schedule keyed to steps alone would
    never get past its start (a dVAE would keep its initial temperature and almost no KL weight, and collapse).
    """
    progress = trainer.state.global_step / max(trainer.state.max_steps, 1)
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TimeBudgetCallback):
            progress = max(progress, callback.elapsed_fraction())
    return min(progress, 1.0)


__all__ = ["BudgetProgressCallback", "TimeBudgetCallback", "add_time_budget", "training_progress"]
