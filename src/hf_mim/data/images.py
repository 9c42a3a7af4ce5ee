"""Fault-tolerant image decoding for training data, and a skip counter shared across DataLoader workers.

Large crawled datasets always contain a few truncated, empty or mislabelled files. Datasets in
hf_mim keep their image column undecoded (`datasets.Image(decode=False)`) and decode here, so a
bad file is logged, counted and skipped instead of ending a multi-day run.
"""

import io
import logging
import multiprocessing
import os
import uuid
import warnings
import weakref
from multiprocessing.context import get_spawning_popen

from datasets.download.download_config import DownloadConfig
from datasets.utils.file_utils import is_local_path, xopen
from PIL import Image, ImageOps

from ..models.image_processing_mim import to_rgb


logger = logging.getLogger(__name__)


def _read_bytes(path: str) -> bytes:
    if is_local_path(path):
        with open(path, "rb") as file:
            return file.read()
    # Remote paths as `datasets` streams them (hf://, https://, chained zip://...::hf://).
    with xopen(path, "rb", download_config=DownloadConfig()) as file:
        return file.read()


def decode_image(value) -> Image.Image | None:
    """Decode one image to 8-bit RGB, or return None (with a warning naming the file) if it cannot be.

    Args:
        value: A PIL image, an undecoded `datasets.Image` value `{"bytes": ..., "path": ...}`, a path
            (`str` or `os.PathLike`, local or remote), or the encoded bytes of an image file.

    Returns:
        The image in RGB (EXIF orientation applied, like `datasets` does), or None for missing,
        empty, truncated or non-image data and for images over PIL's decompression-bomb limit
        (`PIL.Image.MAX_IMAGE_PIXELS`).
    """
    if value is None or (isinstance(value, dict) and value.get("bytes") is None and value.get("path") is None):
        logger.warning("Skipping a missing image (no bytes and no path): %r", value)
        return None
    if isinstance(value, Image.Image):
        name, data, path = getattr(value, "filename", None) or "<PIL image>", None, None
    elif isinstance(value, dict):
        name, data, path = value.get("path") or "<image bytes>", value.get("bytes"), value.get("path")
    elif isinstance(value, (str, os.PathLike)):
        name, data, path = os.fspath(value), None, os.fspath(value)
    elif isinstance(value, (bytes, bytearray)):
        name, data, path = "<image bytes>", value, None
    else:
        raise TypeError(
            f"decode_image expects a PIL image, a {{'bytes', 'path'}} dict, a path or bytes, got "
            f"{type(value).__name__}"
        )
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; a skip is safer than a huge allocation.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if isinstance(value, Image.Image):
                image = value
                image.load()
            else:
                image = Image.open(io.BytesIO(data if data is not None else _read_bytes(path)))
                # Decode now so truncated files fail here rather than inside a later resize.
                image.load()
                ImageOps.exif_transpose(image, in_place=True)
            return to_rgb(image)
    # Corrupt files surface as many exception types across PIL's format plugins (OSError,
    # SyntaxError, struct.error, ValueError, ...); any of them means "this file cannot be used".
    except Exception as error:
        logger.warning("Skipping undecodable image %s: %s: %s", name, type(error).__name__, error)
        return None


def _shared_count():
    # A spawn-context lock can be handed to forked and spawned workers alike.
    return multiprocessing.get_context("spawn").Value("q", 0)


# Live counters of this process by id, so that a copy or a non-spawning pickle round trip (e.g.
# `copy.deepcopy` inside `datasets`, or its fingerprint hashing) resolves to the same counter.
_COUNTERS: "weakref.WeakValueDictionary[str, SkippedImageCounter]" = weakref.WeakValueDictionary()


def _counter_by_id(counter_id: str) -> "SkippedImageCounter":
    counter = _COUNTERS.get(counter_id)
    if counter is None:
        logger.warning(
            "SkippedImageCounter %s was unpickled in a process that did not inherit it; images skipped here are "
            "counted locally and not reported to the process that created it",
            counter_id,
        )
        counter = _counter_from_shared(counter_id, _shared_count())
    return counter


def _counter_from_shared(counter_id: str, shared) -> "SkippedImageCounter":
    counter = _COUNTERS.get(counter_id)
    if counter is None:
        counter = SkippedImageCounter.__new__(SkippedImageCounter)
        counter.counter_id, counter._shared = counter_id, shared
        _COUNTERS[counter_id] = counter
    return counter


class SkippedImageCounter:
    """Counts skipped images across the DataLoader worker processes of one run.

    The count lives in shared memory (`multiprocessing.Value`), so increments made in worker
    processes are visible in the parent, whether workers are forked or spawned: a spawned worker
    receives the shared value through DataLoader's process arguments. Copies and other pickles
    made within a process (or inherited by a fork) refer to the same counter.
    """

    def __init__(self):
        self.counter_id = uuid.uuid4().hex
        self._shared = _shared_count()
        _COUNTERS[self.counter_id] = self

    def increment(self, amount: int = 1) -> None:
        with self._shared.get_lock():
            self._shared.value += amount

    @property
    def value(self) -> int:
        return self._shared.value

    def __repr__(self) -> str:
        return f"{type(self).__name__}(value={self.value})"

    def __reduce__(self):
        # Shared memory can only be handed to a process being started; any other pickle refers to
        # the counter by id (resolved in this process or in a forked child).
        if get_spawning_popen() is not None:
            return _counter_from_shared, (self.counter_id, self._shared)
        return _counter_by_id, (self.counter_id,)


__all__ = ["SkippedImageCounter", "decode_image"]
