"""Convert CCViT's released k-means centroids (`centroids.npy`) into an `hf_mim_kmeans` tokenizer folder.

CCViT's `train_faiss_kmeans.py` writes the 8192 centroids of 16x16 patches of 224 px views as a float32 array of
shape (8192, 768): raw [0, 1] pixels flattened (C, py, px), exactly what [`KmeansModel`] holds. The file is read
with `numpy.load(allow_pickle=False)`, so no pickled object is ever executed.
"""

import logging
import os

import numpy as np

from ..errors import UsageError
from ..hub.cards import write_model_card
from ..models.image_processing_kmeans import KmeansImageProcessor
from ..models.modeling_kmeans import KmeansModel
from ..training.loading import require_output_dir_of
from .common import first_line, require_file

logger = logging.getLogger(__name__)


def convert_ccvit_centroids(
    centroids_path: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    image_size: int = 224,
    num_channels: int = 3,
) -> KmeansModel:
    """The [`KmeansModel`] holding CCViT's centroids; saved with its image processor and card to `output_dir`.

    Args:
        centroids_path: A `.npy` file of shape `(codebook_size, num_channels * patch_size**2)`.
        output_dir: Where to write the tokenizer folder (nothing is written when None).
        image_size: Side of the view the centroids tokenize (CCViT: 224, the ViT's input).
        num_channels: Channels of a patch; the patch size follows from the array's width.
    """
    what = "CCViT's centroids.npy (a float array of shape (codebook_size, 3 * patch_size**2))"
    path = require_file(centroids_path, "--centroids", what)
    with open(path, "rb") as file:
        magic = file.read(6)
    if magic != b"\x93NUMPY" and not magic.startswith(b"PK"):
        # numpy reads any other file as a pickle, and its refusal advises unpickling it.
        raise UsageError(f"--centroids {path} is not a .npy file (no numpy header); pass {what}")
    try:
        centroids = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        # A pickled or object array, an .npz archive's members, a file of another kind.
        raise UsageError(f"--centroids {path} is not a .npy array ({first_line(error)}); pass {what}") from error
    if not isinstance(centroids, np.ndarray):
        # np.load opens any zip archive (an .npz, a PyTorch file) as an .npz.
        raise UsageError(f"--centroids {path} is a zip archive (an .npz or a PyTorch file), not one .npy array; pass {what}")
    if centroids.ndim != 2 or not np.issubdtype(centroids.dtype, np.floating):
        raise UsageError(f"--centroids {path} holds a {centroids.dtype} array of shape {centroids.shape}; pass {what}")
    try:
        tokenizer = KmeansModel.from_centroids(centroids, image_size=image_size, num_channels=num_channels)
    except ValueError as error:
        culprit = f"--image_size {image_size}" if "image_size" in str(error) else f"--centroids {path}"
        raise UsageError(f"{culprit}: {error}") from error
    config = tokenizer.config
    logger.info(
        "Read %d centroids of %dx%d patches (a %dx%d token grid at %d px)",
        config.codebook_size, config.patch_size, config.patch_size, config.grid_size, config.grid_size, image_size,
    )
    if output_dir is not None:
        require_output_dir_of(output_dir, config.model_type)
        tokenizer.save_pretrained(output_dir)
        KmeansImageProcessor.for_config(config).save_pretrained(output_dir)
        write_model_card(output_dir)
    return tokenizer


__all__ = ["convert_ccvit_centroids"]
