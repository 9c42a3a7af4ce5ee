"""Fitting CCViT's centroid tokenizer: k-means (Lloyd's algorithm) on raw pixel patches of an image dataset.

Three layers: `lloyd` (the algorithm on a tensor of points: initialisation, Lloyd's iterations with an exact integer
kernel for 8-bit pixels, under any number of processes), `patches` (the points of an image dataset: each process's
share of the raw patches, with global ids) and `tokenizer` (a [`KmeansModel`] fitted on a dataset, and the scripts'
fit, evaluation, results, model card and upload).
"""

from .lloyd import BACKENDS, INIT_METHODS, KmeansFit, fit_kmeans, init_centroids, point_keys
from .patches import sample_patches, select_images
from .tokenizer import (
    KmeansFitArguments,
    fit_kmeans_tokenizer,
    fit_tokenizer_for_mim,
    require_enough_patches,
    train_kmeans_tokenizer,
)

__all__ = [
    "BACKENDS",
    "INIT_METHODS",
    "KmeansFit",
    "KmeansFitArguments",
    "fit_kmeans",
    "fit_kmeans_tokenizer",
    "fit_tokenizer_for_mim",
    "init_centroids",
    "point_keys",
    "require_enough_patches",
    "sample_patches",
    "select_images",
    "train_kmeans_tokenizer",
]
