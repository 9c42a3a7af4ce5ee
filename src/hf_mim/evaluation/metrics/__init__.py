"""hf_mim's metrics as `evaluate` modules shipped inside the package, so they load offline by path.

`evaluate.load("accuracy")` fetches its script from the Hub and fails without network; these load from
the installed package: `load_metric("accuracy")`, or `evaluate.load(metric_path("accuracy"))`.

- `accuracy`: top-1 of class predictions.
- `masked_accuracy`: token accuracy over the masked patches of each image (per-image token grids plus masks).
- `codebook_usage`: a measurement of token ids: how many codes are used (`num_used_codes`, and the fraction
  `codebook_usage`) and the `codebook_perplexity` of their distribution.
"""

import os

import evaluate

METRICS_DIR = os.path.dirname(os.path.abspath(__file__))
METRIC_NAMES = ("accuracy", "masked_accuracy", "codebook_usage")


def metric_path(name: str) -> str:
    """Folder of the evaluate module `name`, for `evaluate.load`."""
    if name not in METRIC_NAMES:
        raise ValueError(f"Unknown hf_mim metric {name!r}; hf_mim ships {METRIC_NAMES}")
    return os.path.join(METRICS_DIR, name)


def load_metric(name: str, **kwargs) -> evaluate.EvaluationModule:
    """`evaluate.load` of the hf_mim metric `name` (no network needed); `kwargs` go to `evaluate.load`."""
    return evaluate.load(metric_path(name), **kwargs)


__all__ = ["METRICS_DIR", "METRIC_NAMES", "load_metric", "metric_path"]
