"""The `Trainer` base of hf_mim's gradient-trained tokenizers (dVAE, VQ-KD): codebook usage in every log."""

import logging

import torch

from ..evaluation.codebook import codebook_metrics
from ..models.modeling_tokenizer import code_counts
from .trainer import MimTrainer

logger = logging.getLogger(__name__)

# A training window using less of the codebook than this is reported as collapsing (see `TokenizerTrainer`).
LOW_CODEBOOK_USAGE = 0.5
# Tokens per code a window needs before its usage says anything: a uniform codebook then shows 98% of its codes.
_TOKENS_PER_CODE_FOR_USAGE = 4


class TokenizerTrainer(MimTrainer):
    r"""`MimTrainer` for a visual tokenizer whose outputs carry its code `indices`: logs how much of the codebook
    the tokenizer uses.

    Every training log carries `codebook_usage` (the fraction of the codebook's codes assigned at least once) and
    `codebook_perplexity` (see `hf_mim.evaluation.codebook`) of all codes assigned in the logging window, and
    every evaluation `eval_codebook_usage` and `eval_codebook_perplexity` of all codes assigned to the evaluation
    set, counted over all processes: the same numbers as the `codebook_usage` evaluate module and the k-means
    tokenizer's evaluation give for those token ids. Counting whole windows rather than averaging per-batch values
    keeps a small per-device batch from making a healthy codebook look unused.

    The first training window that saw at least 4 tokens per code and used less than `LOW_CODEBOOK_USAGE` of the
    codebook logs a warning with the family's remedy (`collapse_remedy`): a collapsed tokenizer gives MIM a task
    over a few classes.
    """

    # How to keep this family's codes in use, for the collapse warning.
    collapse_remedy = ""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._code_counts: dict[str, torch.Tensor | None] = {"train": None, "eval": None}
        self._eval_prefix: str | None = None
        self._warned_low_usage = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if self.stand_in:  # an example standing in for an undecodable batch (MimTrainer.training_step)
            return (loss, outputs) if return_outputs else loss
        split = "train" if model.training else "eval"
        codebook_size = self.accelerator.unwrap_model(model).config.codebook_size
        counts = code_counts(outputs.indices.detach(), codebook_size)
        self._code_counts[split] = counts if self._code_counts[split] is None else self._code_counts[split] + counts
        return (loss, outputs) if return_outputs else loss

    def _pop_codebook_metrics(self, split: str, prefix: str) -> dict[str, float]:
        counts, self._code_counts[split] = self._code_counts[split], None
        if counts is None:
            codebook_size = self.accelerator.unwrap_model(self.model).config.codebook_size
            counts = torch.zeros(codebook_size, dtype=torch.long, device=self.args.device)
        # Every rank reaches this log together (the Trainer gathers the loss just before), so reduce here.
        counts = self.accelerator.reduce(counts.to(self.accelerator.device), reduction="sum")
        total = counts.sum()
        if total == 0:
            return {}
        metrics = codebook_metrics(counts)
        if split == "train" and total >= _TOKENS_PER_CODE_FOR_USAGE * counts.numel():
            self._warn_if_collapsing(metrics["codebook_usage"], counts.numel())
        return {f"{prefix}{name}": value for name, value in metrics.items()}

    def _warn_if_collapsing(self, usage: float, codebook_size: int) -> None:
        if usage >= LOW_CODEBOOK_USAGE or self._warned_low_usage:
            return
        self._warned_low_usage = True
        if self.is_world_process_zero():
            logger.warning(
                "Codebook collapse: the last logging window used %d of %d codes (%.0f%%, below %.0f%%); its tokens "
                "would give masked image modeling a task over a few classes. %s",
                round(usage * codebook_size), codebook_size, 100 * usage, 100 * LOW_CODEBOOK_USAGE, self.collapse_remedy,
            )  # fmt: skip

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs.update(self._pop_codebook_metrics("train", ""))
        elif self._eval_prefix is not None:
            logs.update(self._pop_codebook_metrics("eval", f"{self._eval_prefix}_"))
        super().log(logs, start_time)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        self._code_counts["eval"] = None
        # A dict of evaluation sets evaluates each under its own prefix, from inside this call.
        outer_prefix, self._eval_prefix = self._eval_prefix, metric_key_prefix
        try:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        finally:
            self._eval_prefix = outer_prefix


__all__ = ["LOW_CODEBOOK_USAGE", "TokenizerTrainer"]
