"""The `Trainer` base of hf_mim's gradient-trained tokenizers (dVAE, VQ-KD): codebook usage in every log."""

import torch

from ..evaluation.codebook import codebook_metrics
from ..models.modeling_tokenizer import code_counts
from .trainer import MimTrainer


class TokenizerTrainer(MimTrainer):
    r"""`MimTrainer` for a visual tokenizer whose outputs carry its code `indices`: logs how much of the codebook
    the tokenizer uses.

    Every training log carries `codebook_usage` (the fraction of the codebook's codes assigned at least once) and
    `codebook_perplexity` (see `hf_mim.evaluation.codebook`) of all codes assigned in the logging window, and
    every evaluation `eval_codebook_usage` and `eval_codebook_perplexity` of all codes assigned to the evaluation
    set, counted over all processes: the same numbers as the `codebook_usage` evaluate module and the k-means
    tokenizer's evaluation give for those token ids. Counting whole windows rather than averaging per-batch values
    keeps a small per-device batch from making a healthy codebook look unused.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._code_counts: dict[str, torch.Tensor | None] = {"train": None, "eval": None}
        self._eval_prefix: str | None = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
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
        if counts.sum() == 0:
            return {}
        return {f"{prefix}{name}": value for name, value in codebook_metrics(counts).items()}

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


__all__ = ["TokenizerTrainer"]
