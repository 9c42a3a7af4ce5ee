"""Evaluation of pretrained encoders: frozen features, linear probe, k-NN, export to transformers BEiT, metrics.

The functions take in-memory models and data (a `datasets` dataset or a list of images and labels), so
scripts and demos call the same code; `scripts/run_linear_probe.py`, `run_knn.py` and
`export_to_transformers.py` are their command lines. `hf_mim.evaluation.metrics` holds the `evaluate`
modules (imported on demand: `evaluate` is slow to import).
"""

from .export import export_to_transformers, resolve_encoder, to_beit_image_processor, to_transformers_beit
from .features import FeatureSet, extract_features, pool_tokens
from .knn import KnnResult, knn_classify
from .probe import LinearProbe, LinearProbeResult, fit_linear_probe, linear_probe

__all__ = [
    "FeatureSet",
    "KnnResult",
    "LinearProbe",
    "LinearProbeResult",
    "export_to_transformers",
    "extract_features",
    "fit_linear_probe",
    "knn_classify",
    "linear_probe",
    "pool_tokens",
    "resolve_encoder",
    "to_beit_image_processor",
    "to_transformers_beit",
]
