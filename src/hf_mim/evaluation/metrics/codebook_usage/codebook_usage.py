"""How much of a visual tokenizer's codebook a set of token ids uses, shipped with hf_mim.

A collapsing tokenizer uses few codes (unilm#877); usage and perplexity are the standard diagnostics. They are
computed by `hf_mim.evaluation.codebook`, as in the tokenizer trainers' logs, so the numbers and names agree.
"""

import datasets
import evaluate
import numpy as np
import torch

from hf_mim.evaluation.codebook import codebook_metrics

_DESCRIPTION = (
    "Counts the distinct codes among the token ids and the perplexity exp(H) of their empirical distribution "
    "(H in nats): equal to codebook_size when all codes are equally frequent, 1 when a single code is used."
)

_KWARGS_DESCRIPTION = """
Args:
    token_ids (`list[int]`): Token ids (flatten the grids of all images).
    codebook_size (`int`): Number of codes of the tokenizer.
Returns:
    num_used_codes (`int`): Distinct codes among the token ids.
    codebook_usage (`float`): The fraction num_used_codes / codebook_size.
    codebook_perplexity (`float`): exp of the entropy of the code frequencies.
Examples:
    >>> measurement = evaluate.load("<hf_mim>/evaluation/metrics/codebook_usage")
    >>> measurement.compute(token_ids=[0, 1, 1, 3], codebook_size=8)
    {'num_used_codes': 3, 'codebook_usage': 0.375, 'codebook_perplexity': 2.82842712474619}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CodebookUsage(evaluate.Measurement):
    def _info(self):
        return evaluate.MeasurementInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"token_ids": datasets.Value("int64")}),
        )

    def _compute(self, token_ids, codebook_size=None):
        if codebook_size is None or codebook_size < 1:
            raise ValueError("Pass codebook_size (the tokenizer's config.codebook_size) to compute()")
        token_ids = np.asarray(token_ids, dtype=np.int64)
        if token_ids.size == 0:
            raise ValueError("No token ids to measure")
        if token_ids.min() < 0 or token_ids.max() >= codebook_size:
            raise ValueError(f"Token ids must be in [0, {codebook_size}); got {token_ids.min()}..{token_ids.max()}")
        counts = np.bincount(token_ids, minlength=codebook_size)
        return {"num_used_codes": int((counts > 0).sum()), **codebook_metrics(torch.from_numpy(counts))}
