"""`TrainingArguments` shared by every hf_mim training script: time budget, non-finite guard, resumption, DataLoader
defaults for GPUs, and a refusal to run a multi-process launch whose processes are not distributed."""

import os
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from ..errors import UsageError


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


@dataclass
class HfMimTrainingArguments(TrainingArguments):
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Start afresh even if output_dir holds checkpoints (else resume from the last)"}
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

    def __post_init__(self):
        if self.dataloader_pin_memory is None:
            self.dataloader_pin_memory = torch.cuda.is_available() and not self.use_cpu
        if self.dataloader_persistent_workers is None:
            self.dataloader_persistent_workers = self.dataloader_num_workers > 0
        if self.max_train_seconds is not None and self.max_train_seconds <= 0:
            raise UsageError(f"--max_train_seconds must be positive, got {self.max_train_seconds}")
        super().__post_init__()
        check_distributed_launch(self)


__all__ = ["HfMimTrainingArguments", "check_distributed_launch"]
