"""Stop training after a wall-clock budget, so that methods compared "for the same CPU budget" get the same time."""

import time

from transformers import TrainerCallback


class TimeBudgetCallback(TrainerCallback):
    """Ends training at the first step that finishes `max_train_seconds` or more after training began.

    The learning-rate schedule still follows `max_steps`; pick a schedule that is sensible when cut short (e.g.
    `constant_with_warmup`) or a `max_steps` the budget reaches.
    """

    def __init__(self, max_train_seconds: float):
        if max_train_seconds <= 0:
            raise ValueError(f"max_train_seconds must be positive, got {max_train_seconds}")
        self.max_train_seconds = max_train_seconds
        self.start = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if time.monotonic() - self.start >= self.max_train_seconds:
            control.should_training_stop = True
        return control


__all__ = ["TimeBudgetCallback"]
