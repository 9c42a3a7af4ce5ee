"""Property-based tests (hypothesis) of image decoding, the two-view transform and the masking generators."""

import io

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from hf_mim.data import (
    BlockwiseMaskingGenerator,
    MimDataCollator,
    RandomMaskingGenerator,
    ReplacementPositionGenerator,
    TwoViewTransform,
    decode_image,
)
from hf_mim.models import MimImageProcessor


FAST = settings(max_examples=25, deadline=None)

# PIL modes a crawled dataset contains, with formats that store them.
MODES = {
    "1": ("PNG", "TIFF"),
    "L": ("PNG", "JPEG", "TIFF"),
    "LA": ("PNG",),
    "P": ("PNG", "GIF"),
    "RGB": ("PNG", "JPEG", "TIFF", "WEBP"),
    "RGBA": ("PNG", "TIFF", "WEBP"),
    "CMYK": ("JPEG", "TIFF"),
    "I;16": ("PNG", "TIFF"),
    "I": ("TIFF",),
    "F": ("TIFF",),
}


@st.composite
def encoded_images(draw):
    mode = draw(st.sampled_from(sorted(MODES)))
    file_format = draw(st.sampled_from(MODES[mode]))
    width, height = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    seed = draw(st.integers(0, 2**16))
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode if mode not in ("I;16", "I", "F") else "L")
    if mode in ("I;16", "I", "F"):
        image = image.convert("I").point(lambda value: value * 257).convert(mode) if mode != "F" else image.convert("F")
    buffer = io.BytesIO()
    image.save(buffer, format=file_format)
    return buffer.getvalue(), (width, height), mode


@FAST
@given(encoded_images(), st.integers(0, 2**32 - 1))
def test_any_mode_and_size_decodes_to_rgb_and_transforms_to_finite_views(encoded, seed):
    data, size, mode = encoded
    image = decode_image(data)
    assert image is not None, f"a valid {mode} image was skipped"
    assert image.mode == "RGB" and image.size == size
    transform = TwoViewTransform(
        MimImageProcessor(size={"height": 16, "width": 16}, crop_size={"height": 16, "width": 16}),
        MimImageProcessor(size={"height": 8, "width": 8}, crop_size={"height": 8, "width": 8}, do_normalize=False),
    )
    views = transform(image, rng=np.random.default_rng(seed))
    assert views["pixel_values"].shape == (3, 16, 16) and torch.isfinite(views["pixel_values"]).all()
    tokenizer_view = views["tokenizer_pixel_values"]
    assert tokenizer_view.shape == (3, 8, 8) and 0 <= tokenizer_view.min() and tokenizer_view.max() <= 1


@FAST
@given(st.binary(max_size=256))
def test_arbitrary_bytes_decode_or_are_skipped_never_raise(data):
    image = decode_image(data)
    assert image is None or image.mode == "RGB"


@st.composite
def blockwise_parameters(draw):
    height, width = draw(st.integers(1, 16)), draw(st.integers(1, 16))
    num_masking = draw(st.integers(0, height * width + 2))
    min_block = draw(st.integers(1, max(1, num_masking + 2)))
    max_block = draw(st.none() | st.integers(0, height * width))
    min_aspect = draw(st.floats(0.05, 3.0))
    return (height, width), num_masking, min_block, max_block, min_aspect, draw(st.booleans())


@FAST
@given(blockwise_parameters(), st.integers(0, 2**32 - 1))
def test_blockwise_masks_have_the_promised_shape_and_count_or_the_config_is_refused(parameters, seed):
    grid, num_masking, min_block, max_block, min_aspect, exact = parameters
    try:
        generator = BlockwiseMaskingGenerator(grid, num_masking, min_block, max_block, min_aspect, exact=exact)
    except ValueError as error:
        # Refused with a message naming the offending parameter.
        assert any(name in str(error) for name in ("num_masking_patches", "num_patches", "min_aspect", "max_aspect"))
        return
    rng = np.random.default_rng(seed)
    for _ in range(3):
        mask = generator(rng)
        assert mask.shape == grid and mask.dtype == bool
        assert mask.sum() == num_masking if exact else mask.sum() <= num_masking


@FAST
@given(st.integers(1, 16), st.integers(1, 16), st.floats(0.0, 1.0), st.integers(0, 64), st.integers(0, 2**32 - 1))
def test_random_masks_and_replacements_are_exact_and_disjoint_or_refused(height, width, ratio, num_replaced, seed):
    num_patches = height * width
    masking = RandomMaskingGenerator((height, width), mask_ratio=ratio)
    assert masking.num_masking_patches == int(ratio * num_patches)
    if num_replaced > num_patches:
        with pytest.raises(ValueError, match="num_replaced_patches must be between 0"):
            ReplacementPositionGenerator((height, width), num_replaced)
        return
    replacing = ReplacementPositionGenerator((height, width), num_replaced)
    if masking.num_masking_patches + num_replaced > num_patches:
        with pytest.raises(ValueError, match="exceed the"):
            MimDataCollator(masking, replacement_generator=replacing)
        return
    batch = MimDataCollator(masking, replacement_generator=replacing)(
        [{"pixel_values": torch.zeros(3, 2, 2), "rng": np.random.default_rng(seed)} for _ in range(2)]
    )
    masked, replaced = batch["bool_masked_pos"], batch["bool_replaced_pos"]
    assert (masked.sum(1) == masking.num_masking_patches).all() and (replaced.sum(1) == num_replaced).all()
    assert not (masked & replaced).any()
