"""How much of its codebook a visual tokenizer uses: the one definition of hf_mim's codebook metrics.

A collapsing tokenizer assigns few codes (unilm#877). Every tokenizer family reports the same two numbers under the
same names, computed here from per-code counts of the token ids of a measured set: the tokenizer trainers' logging
windows and evaluation sets (`hf_mim.training.tokenizer_trainer`), the k-means validation patches, and the
`codebook_usage` evaluate module.
"""

import torch


def codebook_metrics(counts: torch.Tensor) -> dict[str, float]:
    r"""`codebook_usage` and `codebook_perplexity` of a set of token ids, from how often each code occurs in it.

    - `codebook_usage`: the *fraction* (in [0, 1], not a count) of the codebook's codes that occur at least once.
    - `codebook_perplexity`: `exp` of the entropy (nats) of the code frequencies, the number of equally frequent
      codes the distribution is worth: 1 when a single code is used, the number of used codes when all of them
      are used equally often, never more.

    Args:
        counts (`torch.Tensor` of shape `(codebook_size,)`):
            Occurrences of each code, e.g. `torch.bincount(token_ids.flatten(), minlength=codebook_size)`.
    """
    if counts.ndim != 1 or counts.numel() == 0:
        raise ValueError(f"counts must hold one count per code, shape (codebook_size,); got {tuple(counts.shape)}")
    # Exact for any realistic number of tokens, and float64 is not available on every accelerator.
    counts = counts.detach().to("cpu", torch.float64)
    if (counts < 0).any():
        raise ValueError("counts must be non-negative occurrences of each code")
    total = counts.sum()
    if total == 0:
        raise ValueError("No token ids were counted: codebook usage and perplexity are undefined for an empty set")
    frequencies = counts[counts > 0] / total
    return {
        "codebook_usage": (counts > 0).sum().item() / counts.numel(),
        "codebook_perplexity": torch.exp(-(frequencies * frequencies.log()).sum()).item(),
    }


__all__ = ["codebook_metrics"]
