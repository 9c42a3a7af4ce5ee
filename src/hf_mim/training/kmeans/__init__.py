"""Fitting k-means tokenizers: Lloyd's algorithm on raw pixel patches of an image dataset (CCViT's centroids) or on a
frozen teacher's patch features (feature k-means).

Three layers: `lloyd` (the algorithm on a tensor of points: initialisation, Lloyd's iterations with an exact integer
kernel for 8-bit pixels, under any number of processes), `patches` and `features` (the points of an image dataset:
each process's share of the raw patches, or of a teacher's patch features, with global ids) and `tokenizer` (a
[`KmeansModel`] or [`FeatureKmeansModel`] fitted on a dataset, and the scripts' fit, evaluation, results, model card
and upload).
"""

from .features import feature_kmeans_tokenizer, sample_features
from .lloyd import BACKENDS, INIT_METHODS, KmeansFit, fit_kmeans, init_centroids, point_keys
from .patches import sample_patches, select_images
from .tokenizer import (
    KmeansFitArguments,
    fit_centroids,
    fit_kmeans_tokenizer,
    fit_tokenizer_for_mim,
    require_enough_patches,
    sample_points,
    train_feature_kmeans_tokenizer,
    train_kmeans_tokenizer,
)

__all__ = [
    "BACKENDS",
    "INIT_METHODS",
    "KmeansFit",
    "KmeansFitArguments",
    "feature_kmeans_tokenizer",
    "fit_centroids",
    "fit_kmeans",
    "fit_kmeans_tokenizer",
    "fit_tokenizer_for_mim",
    "init_centroids",
    "point_keys",
    "require_enough_patches",
    "sample_features",
    "sample_patches",
    "sample_points",
    "select_images",
    "train_feature_kmeans_tokenizer",
    "train_kmeans_tokenizer",
]
