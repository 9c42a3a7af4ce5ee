"""Tests of the hf_mim data pipeline: decoding, the two-view transform, datasets, collation and DataLoader workers."""

import copy
import io
import logging
import os
import pickle

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers.image_utils import PILImageResampling

from hf_mim.data import (
    BlockwiseMaskingGenerator,
    MimDataCollator,
    SkippedImageCounter,
    TwoViewTransform,
    apply_transform,
    center_crop_view,
    decode_image,
    load_image_datasets,
    random_resized_crop_box,
)
from conftest import write_images
from hf_mim.errors import UsageError
from hf_mim.models import DvaeImageProcessor, MimImageProcessor


BAD_FILES = ("truncated.jpg", "empty.png", "notes.jpg")


def gradient_image(width: int = 256, height: int = 200) -> Image.Image:
    """Red encodes the column, green the row: every pixel names its own position."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[..., 0] = np.arange(width)[None, :]
    array[..., 1] = np.arange(height)[:, None]
    array[..., 2] = 128
    return Image.fromarray(array)


def encode(image: Image.Image, format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format)
    return buffer.getvalue()


def truncated_jpeg() -> bytes:
    """A JPEG cut after its headers: PIL opens it lazily and fails only when decoding the pixels."""
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "JPEG")
    data = data[: len(data) * 2 // 3]
    assert Image.open(io.BytesIO(data)).size == (64, 64)
    return data


def unnormalized(size: int, resample: PILImageResampling) -> MimImageProcessor:
    return MimImageProcessor(size={"height": size, "width": size}, resample=resample, do_normalize=False)


def small_processor(size: int = 32) -> MimImageProcessor:
    return MimImageProcessor(size={"height": size, "width": size})


def palette_image(transparent: bool) -> Image.Image:
    image = Image.new("P", (48, 40))
    image.putpalette([value for index in range(256) for value in (index, 255 - index, 7)])
    image.putdata([index % 256 for index in range(48 * 40)])
    if transparent:
        image.info["transparency"] = 0
    return image


def ramp(dtype, low: float, high: float) -> Image.Image:
    return Image.fromarray(np.linspace(low, high, 48 * 40).reshape(40, 48).astype(dtype))


# mode -> (image, file format that stores the mode)
MODE_IMAGES = {
    "L": (lambda: Image.new("L", (48, 40), 100), "PNG"),
    "LA": (lambda: Image.new("LA", (48, 40), (100, 51)), "PNG"),
    "RGBA": (lambda: Image.new("RGBA", (48, 40), (0, 0, 255, 102)), "PNG"),
    "P": (lambda: palette_image(transparent=False), "PNG"),
    "P-transparent": (lambda: palette_image(transparent=True), "PNG"),
    "CMYK": (lambda: Image.new("CMYK", (48, 40), (0, 255, 0, 0)), "JPEG"),
    "I;16": (lambda: ramp(np.uint16, 0, 65535), "PNG"),
    "I": (lambda: ramp(np.int32, -1000, 70000), "TIFF"),
    "F": (lambda: ramp(np.float32, -1.0, 3.0), "TIFF"),
}


@pytest.fixture
def messy_folder(tmp_path):
    """train/ with 6 good images in two classes and three bad files; validation/ with 2 good images."""
    for split, count in (("train", 6), ("validation", 2)):
        for index in range(count):
            folder = tmp_path / split / ("cats" if index % 2 else "dogs")
            folder.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng(index)
            Image.fromarray(rng.integers(0, 256, (24 + index, 40, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    bad = tmp_path / "train" / "dogs"
    (bad / "truncated.jpg").write_bytes(truncated_jpeg())
    (bad / "empty.png").write_bytes(b"")
    (bad / "notes.jpg").write_text("not an image at all")
    return tmp_path


# --------------------------------------------------------------------------------------------- decoding


@pytest.mark.smoke
@pytest.mark.parametrize("mode", list(MODE_IMAGES))
def test_every_mode_decodes_to_rgb_from_file_bytes_and_pil(mode):
    make, file_format = MODE_IMAGES[mode]
    data = encode(make(), file_format)
    assert Image.open(io.BytesIO(data)).mode == mode.split("-")[0]
    for value in (data, {"bytes": data, "path": None}, make()):
        image = decode_image(value)
        assert image.mode == "RGB" and image.size == (48, 40)


def test_mode_conversions_keep_content():
    def decoded(mode):
        make, file_format = MODE_IMAGES[mode]
        return np.asarray(decode_image(encode(make(), file_format))).astype(int)

    np.testing.assert_array_equal(decoded("L"), 100)
    # Alpha composited onto white: 100 * 0.2 + 255 * 0.8 = 224; blue at 40% over white = (153, 153, 255).
    np.testing.assert_allclose(decoded("LA"), 224, atol=1)
    np.testing.assert_allclose(decoded("RGBA")[0, 0], [153, 153, 255], atol=1)
    palette = decoded("P")
    np.testing.assert_array_equal(palette[0, :3], [[0, 255, 7], [1, 254, 7], [2, 253, 7]])
    transparent = decoded("P-transparent")
    np.testing.assert_array_equal(transparent[0, 0], [255, 255, 255])  # index 0 is the transparent colour
    np.testing.assert_array_equal(transparent[0, 1], [1, 254, 7])
    np.testing.assert_allclose(decoded("CMYK")[20, 20], [255, 0, 255], atol=3)  # magenta
    for mode in ("I;16", "I", "F"):
        gray = decoded(mode)
        # High bit depths keep their contrast (PIL's own convert would clip them to almost all white).
        assert gray.min() <= 1 and gray.max() >= 254 and 100 < gray.mean() < 155, mode
        assert (gray[..., 0] == gray[..., 2]).all()


@pytest.mark.parametrize("mode", list(MODE_IMAGES))
def test_every_mode_goes_through_the_transform(mode):
    make, _ = MODE_IMAGES[mode]
    transform = TwoViewTransform(small_processor(), DvaeImageProcessor())
    outputs = transform(make(), rng=np.random.default_rng(0))
    assert outputs["pixel_values"].shape == (3, 32, 32) and outputs["tokenizer_pixel_values"].shape == (3, 112, 112)


def test_bad_data_is_skipped_with_a_warning_naming_it(tmp_path, caplog):
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(truncated_jpeg())
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.jpg"
    text.write_text("hello")
    cases = [str(truncated), {"bytes": None, "path": str(empty)}, text, b"", {"bytes": b"GIF89a", "path": "x.gif"}]
    with caplog.at_level(logging.WARNING, logger="hf_mim.data.images"):
        for value in [*cases, str(tmp_path / "missing.png"), None, {"bytes": None, "path": None}]:
            assert decode_image(value) is None
    for name in ("truncated.jpg", "empty.png", "notes.jpg", "x.gif", "missing.png"):
        assert name in caplog.text
    # A good file still decodes, with the EXIF orientation applied as `datasets` does.
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    gradient_image(64, 32).save(buffer, "JPEG", exif=exif)
    assert decode_image(buffer.getvalue()).size == (32, 64)
    with pytest.raises(TypeError, match="decode_image expects"):
        decode_image(3.5)


def test_decompression_bombs_are_skipped(monkeypatch, caplog):
    data = encode(gradient_image(40, 40), "PNG")  # 1600 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL warns above 1000 pixels and raises above 2000
    with caplog.at_level(logging.WARNING, logger="hf_mim.data.images"):
        assert decode_image(data) is None
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
        assert decode_image(data) is None
    assert "DecompressionBombWarning" in caplog.text and "DecompressionBombError" in caplog.text
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    assert decode_image(data).size == (40, 40)


def test_skip_counter_is_shared_by_copies_and_pickles():
    counter = SkippedImageCounter()
    assert copy.deepcopy(counter) is counter
    pickle.loads(pickle.dumps(counter)).increment(2)
    counter.increment()
    assert counter.value == 3


# ---------------------------------------------------------------------------------------- two-view transform


def test_both_views_show_the_same_crop_including_flips():
    transform = TwoViewTransform(
        unnormalized(224, PILImageResampling.BICUBIC), unnormalized(112, PILImageResampling.LANCZOS), color_jitter=0
    )
    image = gradient_image()
    flipped = 0
    for seed in range(100):
        views = transform(image, rng=np.random.default_rng(seed))
        vit, tokenizer = views["pixel_values"] * 255, views["tokenizer_pixel_values"] * 255
        # Position channels of the 224 view, averaged 2x2, are the 112 view's up to rounding.
        pooled = torch.nn.functional.avg_pool2d(vit[None, :2], 2)[0]
        assert (pooled - tokenizer[:2]).abs().max() <= 1.0, seed
        columns = vit[0].mean(dim=0)
        flipped += bool(columns[-1] < columns[0])
        # Crops are upright and either mirrored or not, never mixed.
        assert (vit[1, -1] > vit[1, 0]).all()
        assert (columns.diff() <= 0.5).all() or (columns.diff() >= -0.5).all()
    assert 30 < flipped < 70
    # A view from another crop does not match (the comparison above is not vacuous).
    other = transform(image, rng=np.random.default_rng(1000))["tokenizer_pixel_values"] * 255
    first = transform(image, rng=np.random.default_rng(0))["pixel_values"] * 255
    assert (torch.nn.functional.avg_pool2d(first[None, :2], 2)[0] - other[:2]).abs().max() > 5


@pytest.mark.parametrize("hflip_prob", [0.0, 1.0])
def test_views_are_exact_renderings_of_the_crop_with_each_processors_size_filter_and_normalisation(hflip_prob):
    vit_processor = MimImageProcessor()  # 224 bicubic, ImageNet mean/std
    dvae_processor = DvaeImageProcessor()  # 112 Lanczos, logit-Laplace map 0.8 x + 0.1
    transform = TwoViewTransform(vit_processor, dvae_processor, color_jitter=0, hflip_prob=hflip_prob, exact=True)
    image = gradient_image(300, 180)
    for seed in range(5):
        views = transform(image, rng=np.random.default_rng(seed))
        # Replay the transform's draws: the flip, then the crop box.
        rng = np.random.default_rng(seed)
        source = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < hflip_prob else image
        top, left, height, width = random_resized_crop_box(300, 180, (0.08, 1.0), (3 / 4, 4 / 3), rng)
        # torchvision's resized_crop (BEiT's two-view crop): crop, then resample the crop alone.
        crop = source.crop((left, top, left + width, top + height))
        for key, size, resample in (
            ("pixel_values", 224, Image.Resampling.BICUBIC),
            ("tokenizer_pixel_values", 112, Image.Resampling.LANCZOS),
        ):
            expected = np.asarray(crop.resize((size, size), resample), dtype=np.float32) / 255
            expected = torch.from_numpy(expected).permute(2, 0, 1)
            if key == "pixel_values":
                mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
                std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
                expected = (expected - mean) / std
            else:
                expected = 0.8 * expected + 0.1
            assert views[key].dtype == torch.float32
            torch.testing.assert_close(views[key], expected, atol=1e-5, rtol=0)
    dvae_view = transform(image, rng=np.random.default_rng(0))["tokenizer_pixel_values"]
    assert dvae_view.min() >= 0.1 - 1e-6 and dvae_view.max() <= 0.9 + 1e-6


def photo(width: int = 320, height: int = 240) -> Image.Image:
    """A real photo (scikit-learn's bundled china.jpg), cropped: edges, textures and saturated sky."""
    from sklearn.datasets import load_sample_image

    return Image.fromarray(load_sample_image("china.jpg")).crop((100, 60, 100 + width, 60 + height))


def levels(views: dict, transform: TwoViewTransform) -> dict[str, torch.Tensor]:
    """Each view in 8-bit levels of the [0, 1] image (its processor's normalisation undone)."""
    out = {}
    for key, processor in transform.views.items():
        view = views[key]
        if processor.do_normalize:
            std = torch.tensor(processor.image_std).view(3, 1, 1)
            mean = torch.tensor(processor.image_mean).view(3, 1, 1)
            view = view * std + mean
        out[key] = view * 255
    return out


@pytest.mark.parametrize("color_jitter", [0.0, 0.4])
def test_default_views_are_the_exact_views_within_the_stated_tolerance(color_jitter):
    # BEiT's views: torch resamples the bicubic ViT view and the dVAE's Lanczos view, both from the crop alone.
    views = (MimImageProcessor(), DvaeImageProcessor())
    fast = TwoViewTransform(*views, color_jitter=color_jitter)
    exact = TwoViewTransform(*views, color_jitter=color_jitter, exact=True)
    image, differences = photo(), {key: [] for key in fast.views}
    for seed in range(12):
        fast_rng, exact_rng = np.random.default_rng(seed), np.random.default_rng(seed)
        got, expected = levels(fast(image, rng=fast_rng), fast), levels(exact(image, rng=exact_rng), exact)
        # The same draws: both leave the generator in the same state.
        assert fast_rng.random() == exact_rng.random()
        for key in got:
            difference = (got[key] - expected[key]).abs()
            differences[key].append(difference.flatten())
            if not color_jitter:
                # Resampling alone, of the same crop: torch's antialiased bicubic is PIL's up to rounding.
                assert difference.max() <= 2.0, (key, seed)
                if key == "tokenizer_pixel_values":
                    # torch's Lanczos is PIL's without its 8-bit rounding of each pass.
                    assert difference.max() <= 1.5 and difference.mean() < 0.4, seed
    for key, values in differences.items():
        values = torch.cat(values)
        mean, tail = values.mean().item(), values.quantile(0.999).item()
        if not color_jitter:
            # The Lanczos view keeps its fractions where PIL rounds (about 0.25 level on average).
            assert mean < (0.4 if key == "tokenizer_pixel_values" else 0.1) and tail <= 8.0, (key, mean, tail)
        else:
            # PIL truncates to 8 bits after each jitter step (about 0.5 level darker each) and clips before
            # resampling; the float jitter after resampling does neither.
            assert mean < 2.5 and tail <= 40.0, (key, mean, tail)


def test_default_contrast_blends_towards_the_whole_images_mean_not_the_crops():
    # A bright centre in a black frame: small crops of the centre have a mean far from the whole image's.
    array = np.zeros((120, 120, 3), dtype=np.uint8)
    array[30:90, 30:90] = (200, 180, 160)
    image = Image.fromarray(array)
    processor = MimImageProcessor(size={"height": 32, "width": 32}, do_normalize=False)
    options = {"crop_scale": (0.05, 0.05), "crop_ratio": (1.0, 1.0), "color_jitter": 0.4}
    fast, exact = TwoViewTransform(processor, **options), TwoViewTransform(processor, exact=True, **options)
    compared = 0
    for seed in range(20):
        got = fast(image, rng=np.random.default_rng(seed))["pixel_values"] * 255
        expected = exact(image, rng=np.random.default_rng(seed))["pixel_values"] * 255
        difference = (got - expected).abs()
        # Inside the bright square (away from the frame's edge), the two agree to a few levels of rounding.
        inside = (expected.min(dim=0).values > 60)
        if inside.float().mean() > 0.5:
            compared += 1
            assert difference[:, inside].median() <= 3.0, seed
    assert compared >= 5


def test_unnormalized_tokenizer_view_and_single_view():
    vqkd_like = MimImageProcessor(do_normalize=False)  # VQ-KD / CCViT: 224 bicubic in [0, 1]
    transform = TwoViewTransform(MimImageProcessor(), vqkd_like, color_jitter=0)
    views = transform(gradient_image(), rng=np.random.default_rng(0))
    assert views["tokenizer_pixel_values"].min() >= 0 and views["tokenizer_pixel_values"].max() <= 1
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    torch.testing.assert_close(views["pixel_values"], (views["tokenizer_pixel_values"] - mean) / std)
    assert list(TwoViewTransform(MimImageProcessor())(gradient_image())) == ["pixel_values"]


def test_color_jitter_factors_stay_in_range_and_zero_disables_it():
    gray = Image.new("RGB", (64, 64), (128, 128, 128))
    processor = unnormalized(16, PILImageResampling.BILINEAR)
    # A uniform gray image is unchanged by contrast and saturation, so only brightness (128 * b) shows.
    jittered = TwoViewTransform(processor, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), color_jitter=0.4)
    values = []
    for seed in range(200):
        view = jittered(gray, rng=np.random.default_rng(seed))["pixel_values"] * 255
        assert view.max() - view.min() <= 1e-4
        values.append(view.mean().item())
    assert 128 * 0.6 - 1 <= min(values) < 128 * 0.7 and 128 * 1.3 < max(values) <= 128 * 1.4 + 1
    plain = TwoViewTransform(processor, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), color_jitter=0)
    for seed in range(10):
        view = plain(gray, rng=np.random.default_rng(seed))["pixel_values"]
        torch.testing.assert_close(view, torch.full((3, 16, 16), 128 / 255))


def test_transform_follows_torch_rng():
    transform = TwoViewTransform(small_processor(), DvaeImageProcessor())
    image = gradient_image()
    torch.manual_seed(0)
    first = transform(image)
    torch.manual_seed(0)
    again = transform(image)
    second = transform(image)
    torch.testing.assert_close(first, again)
    assert not torch.equal(first["pixel_values"], second["pixel_values"])


def test_eval_mode_is_the_processors_deterministic_preprocessing():
    vit_processor, dvae_processor = MimImageProcessor(), DvaeImageProcessor()
    transform = TwoViewTransform(vit_processor, dvae_processor, train=False)
    image = gradient_image()
    views = transform(image)
    torch.manual_seed(0)
    assert torch.equal(views["pixel_values"], transform(image)["pixel_values"])
    torch.testing.assert_close(views["pixel_values"], vit_processor(image, return_tensors="pt")["pixel_values"][0])
    torch.testing.assert_close(
        views["tokenizer_pixel_values"], dvae_processor(image, return_tensors="pt")["pixel_values"][0]
    )
    assert views["tokenizer_pixel_values"].shape == (3, 112, 112)


def test_random_resized_crop_box_matches_torchvision_rules():
    rng = np.random.default_rng(0)
    for _ in range(500):
        top, left, height, width = random_resized_crop_box(300, 200, (0.08, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= top and top + height <= 200 and 0 <= left and left + width <= 300
        assert 0.08 * 60000 * 0.9 <= height * width <= 60000
    # No attempt can fit a crop of 4x the image: centre crop clamped to the ratio range.
    assert random_resized_crop_box(400, 100, (4.0, 4.0), (3 / 4, 4 / 3), rng) == (0, 133, 100, 133)
    assert random_resized_crop_box(100, 400, (4.0, 4.0), (3 / 4, 4 / 3), rng) == (133, 0, 133, 100)
    assert random_resized_crop_box(120, 100, (4.0, 4.0), (3 / 4, 4 / 3), rng) == (0, 0, 100, 120)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"crop_scale": (0.5, 0.2)}, "crop_scale"),
        ({"crop_ratio": (0.0, 1.0)}, "crop_ratio"),
        ({"hflip_prob": 1.5}, "hflip_prob"),
        ({"color_jitter": -0.1}, "color_jitter"),
    ],
)
def test_transform_rejects_bad_arguments(kwargs, error):
    with pytest.raises(ValueError, match=error):
        TwoViewTransform(MimImageProcessor(), **kwargs)
    with pytest.raises(TypeError, match="MimImageProcessor"):
        TwoViewTransform(object())


# ------------------------------------------------------------------------------------------------ collator


def test_collator_stacks_views_and_flattens_masks_row_major():
    fixed = np.zeros((2, 3), dtype=bool)
    fixed[0, 2] = fixed[1, 0] = True
    collator = MimDataCollator(mask_generator=lambda: fixed)
    examples = [
        {
            "pixel_values": torch.full((3, 8, 8), float(index)),
            "tokenizer_pixel_values": torch.zeros(3, 4, 4),
            "label": index,
        }
        for index in range(3)
    ]
    batch = collator(examples)
    assert set(batch) == {"pixel_values", "tokenizer_pixel_values", "label", "bool_masked_pos"}
    assert batch["pixel_values"].shape == (3, 3, 8, 8) and batch["pixel_values"].dtype == torch.float32
    assert batch["tokenizer_pixel_values"].shape == (3, 3, 4, 4)
    assert batch["label"].tolist() == [0, 1, 2]
    assert batch["bool_masked_pos"].dtype == torch.bool and batch["bool_masked_pos"].shape == (3, 6)
    assert batch["bool_masked_pos"][0].tolist() == [False, False, True, True, False, False]
    assert "bool_masked_pos" not in MimDataCollator()(examples)


def test_collator_draws_a_fresh_mask_per_example_and_drops_undecodable_ones():
    skipped = SkippedImageCounter()
    collator = MimDataCollator(BlockwiseMaskingGenerator(14, 75), skipped=skipped)
    good = {"pixel_values": torch.zeros(3, 8, 8)}
    batch = collator([good, None, {"pixel_values": None, "tokenizer_pixel_values": None}, *[good] * 7])
    assert batch["pixel_values"].shape[0] == 8 and skipped.value == 2
    masks = batch["bool_masked_pos"]
    assert (masks.sum(dim=1) == 75).all() and len({tuple(mask.tolist()) for mask in masks}) == 8
    assert collator([None, {"pixel_values": None}]) == {}
    assert skipped.value == 4


# ------------------------------------------------------------------------------------------------ datasets


def test_imagefolder_with_validation_dir_and_bad_files_map_style(messy_folder, caplog):
    raw, image_column = load_image_datasets(
        train_dir=str(messy_folder / "train"),
        validation_dir=str(messy_folder / "validation"),
        cache_dir=str(messy_folder / "cache"),
    )
    assert image_column == "image" and set(raw) == {"train", "validation"}
    assert raw["train"].num_rows == 9 and raw["validation"].num_rows == 2
    assert raw["train"].features["image"] == datasets.Image(decode=False)
    skipped = SkippedImageCounter()
    transform = TwoViewTransform(small_processor(), DvaeImageProcessor())
    train = apply_transform(raw["train"], image_column, transform, skipped=skipped, keep_columns=["label"])
    with caplog.at_level(logging.WARNING, logger="hf_mim.data.images"):
        examples = [train[index] for index in range(len(train))]
    assert skipped.value == 3
    assert all(name in caplog.text for name in BAD_FILES)
    bad = [example for example in examples if example["pixel_values"] is None]
    assert len(bad) == 3
    batch = MimDataCollator(BlockwiseMaskingGenerator(2, 2, 1))(examples)
    assert batch["pixel_values"].shape == (6, 3, 32, 32) and batch["tokenizer_pixel_values"].shape == (6, 3, 112, 112)
    assert batch["bool_masked_pos"].shape == (6, 4) and batch["label"].shape == (6,)
    # Slices (batched access) work too, and the raw dataset is left untouched.
    assert len(train[:4]["pixel_values"]) == 4
    assert "pixel_values" not in raw["train"][0]


def test_imagefolder_streaming_skips_bad_files_without_ending_iteration(messy_folder):
    raw, image_column = load_image_datasets(train_dir=str(messy_folder / "train"), streaming=True)
    assert isinstance(raw["train"], datasets.IterableDataset) and "validation" not in raw
    skipped = SkippedImageCounter()
    train = apply_transform(raw["train"], image_column, TwoViewTransform(small_processor()), skipped=skipped)
    examples = list(train)
    # The undecodable ones are counted and left out of the stream (a dispatched stream cannot pass an empty batch).
    assert len(examples) == 6 and skipped.value == 3
    assert sorted(examples[0]) == ["pixel_values"]
    assert all(example["pixel_values"] is not None for example in examples)
    batches = list(torch.utils.data.DataLoader(train, batch_size=4, collate_fn=MimDataCollator()))
    assert [len(batch["pixel_values"]) for batch in batches] == [4, 2] and skipped.value == 6


def test_in_memory_dataset_map_style_and_streaming():
    images = [gradient_image(40 + index, 30) for index in range(4)]
    dataset = datasets.Dataset.from_dict({"img": images, "caption": ["a", "b", "c", "d"]})
    assert isinstance(dataset.features["img"], datasets.Image)
    transform = TwoViewTransform(small_processor())
    for candidate in (dataset, dataset.to_iterable_dataset()):
        transformed = apply_transform(candidate, "img", transform)
        examples = [transformed[index] for index in range(4)] if candidate is dataset else list(transformed)
        batch = MimDataCollator(BlockwiseMaskingGenerator(4, 6, 2))(examples)
        assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["bool_masked_pos"].shape == (4, 16)
        assert set(batch) == {"pixel_values", "bool_masked_pos"}
    with pytest.raises(ValueError, match="not in the dataset"):
        apply_transform(dataset, "image", transform)


def test_image_column_resolution_and_validation_split(tmp_path):
    def parquet_dataset(name: str, columns: dict) -> str:
        (tmp_path / name).mkdir()
        datasets.Dataset.from_dict(columns).to_parquet(str(tmp_path / name / "train.parquet"))
        return str(tmp_path / name)

    pictures = [gradient_image(20, 20)] * 10
    for column in ("image", "img", "picture"):
        path = parquet_dataset(column, {"text": ["x"] * 10, column: pictures})
        raw, image_column = load_image_datasets(path, train_val_split=0.2, seed=0)
        assert image_column == column
        assert raw["train"].num_rows == 8 and raw["validation"].num_rows == 2
        assert raw["train"].features[column] == datasets.Image(decode=False)
    raw, image_column = load_image_datasets(str(tmp_path / "img"), image_column_name="img", max_train_samples=3)
    assert raw["train"].num_rows == 3 and "validation" not in raw
    with pytest.raises(ValueError, match="image_column_name"):
        load_image_datasets(str(tmp_path / "img"), image_column_name="photo")
    with pytest.raises(ValueError, match="image_column_name"):
        load_image_datasets(parquet_dataset("text", {"text": ["x"] * 4}))
    with pytest.raises(ValueError, match="train_dir"):
        load_image_datasets()
    with pytest.raises(ValueError, match="streaming"):
        load_image_datasets(str(tmp_path / "image"), streaming=True, train_val_split=0.1)


def _class_folders(root, classes, depth_below_class: int = 0) -> str:
    for index, name in enumerate(classes):
        folder = root.joinpath(name, *["sub"] * depth_below_class)
        folder.mkdir(parents=True)
        gradient_image(20, 20 + index).save(folder / f"{index}.png")
    return str(root)


def test_class_folders_label_a_validation_folder_at_another_depth(tmp_path):
    """datasets labels imagefolder images only when all images of all splits sit at one depth of the file system;
    a validation folder elsewhere lost the labels of both splits."""
    from hf_mim.data import LabelledImageDatasetArguments
    from hf_mim.data.arguments import load_image_datasets_from_args

    train = _class_folders(tmp_path / "train", ["cats", "dogs"])
    validation = _class_folders(tmp_path / "elsewhere" / "deeper" / "validation", ["dogs", "cats"])
    args = LabelledImageDatasetArguments(train_dir=train, validation_dir=validation)
    raw, _ = load_image_datasets_from_args(args, seed=0)
    names = raw["train"].features["label"].names
    assert names == ["cats", "dogs"] and raw["validation"].features["label"].names == names
    assert [names[label] for label in raw["validation"]["label"]] == ["cats", "dogs"]
    assert [os.path.basename(os.path.dirname(row["image"]["path"])) for row in raw["validation"]] == ["cats", "dogs"]


@pytest.mark.parametrize(
    "layout, error",
    [
        ("flat validation", "--validation_dir {validation}: {validation}/0.png sits directly in it, outside any class"),
        ("deep validation", "--validation_dir {validation}: {validation}/dogs/sub/0.png sits 2 folders down"),
        ("one class", "--train_dir {train} has one class folder ('dogs'); a classifier needs the images of two"),
    ],
)
def test_class_folders_refuse_layouts_whose_labels_would_be_wrong(tmp_path, layout, error):
    train = _class_folders(tmp_path / "train", ["dogs"] if layout == "one class" else ["cats", "dogs"])
    validation = tmp_path / "validation"
    if layout == "flat validation":
        validation.mkdir()
        gradient_image(20, 20).save(validation / "0.png")
    else:
        _class_folders(validation, ["dogs"], depth_below_class=1 if layout == "deep validation" else 0)
    with pytest.raises(UsageError) as raised:
        load_image_datasets(train_dir=train, validation_dir=str(validation), class_folders=True)
    assert str(raised.value).startswith(error.format(train=train, validation=validation))
    # Pre-training reads no labels, so any layout is fine for it.
    raw, _ = load_image_datasets(train_dir=train, validation_dir=str(validation))
    assert raw["validation"].num_rows == 1


def test_files_that_are_not_read_are_counted_once_and_named_by_kind(tmp_path, caplog, monkeypatch):
    train = _class_folders(tmp_path / "train", ["cats", "dogs"])
    for name in ("a.heic", "b.HEIC", "notes.txt", "README"):
        (tmp_path / "train" / "cats" / name).write_bytes(b"x")
    (tmp_path / "train" / ".DS_Store").write_bytes(b"x")
    for skipped in (".ipynb_checkpoints", "__MACOSX"):  # folders datasets does not read
        (tmp_path / "train" / "cats" / skipped).mkdir()
        gradient_image(20, 20).save(tmp_path / "train" / "cats" / skipped / "0.png")
    with caplog.at_level(logging.WARNING, logger="hf_mim.data.datasets"):
        raw, _ = load_image_datasets(train_dir=train, class_folders=True)
    assert raw["train"].num_rows == 2
    warnings = [record.getMessage() for record in caplog.records if record.name == "hf_mim.data.datasets"]
    assert warnings == [
        f"--train_dir {train}: left out 4 file(s) that imagefolder does not read as images (2 .heic, 1 .txt, 1 README)"
    ]
    caplog.clear()
    monkeypatch.setenv("RANK", "1")  # the other processes of a launch stay quiet
    with caplog.at_level(logging.WARNING, logger="hf_mim.data.datasets"):
        load_image_datasets(train_dir=train)
    assert not [record for record in caplog.records if record.name == "hf_mim.data.datasets"]
    # A folder of files PIL knows but imagefolder does not read is a folder without images, and says what it holds.
    only_pdf = tmp_path / "pdf"
    only_pdf.mkdir()
    (only_pdf / "scan.pdf").write_bytes(b"x")
    with pytest.raises(UsageError, match=r"holds no image files .* \(it holds 1 \.pdf\)"):
        load_image_datasets(train_dir=str(only_pdf))


# --------------------------------------------------------------------------------------- DataLoader workers


def _loader(dataset, seed: int, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    collator = MimDataCollator(BlockwiseMaskingGenerator(4, 6, 2))
    return torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=collator, generator=generator, **kwargs)


def test_dataloader_workers_count_skips_in_the_parent_and_are_reproducible(messy_folder):
    raw, image_column = load_image_datasets(
        train_dir=str(messy_folder / "train"), cache_dir=str(messy_folder / "cache")
    )
    skipped = SkippedImageCounter()
    train = apply_transform(raw["train"], image_column, TwoViewTransform(small_processor()), skipped=skipped)
    runs = []
    for _ in range(2):
        runs.append([batch for batch in _loader(train, seed=0, num_workers=2, shuffle=True)])
    assert skipped.value == 6  # 3 bad files, 2 epochs, counted in forked workers
    assert sum(len(batch.get("pixel_values", [])) for batch in runs[0]) == 6
    for first, again in zip(*runs, strict=True):
        assert first.keys() == again.keys()
        for key in first:
            assert torch.equal(first[key], again[key])
    # Workers draw different masks and crops (DataLoader seeds torch per worker).
    masks = torch.cat([batch["bool_masked_pos"] for batch in runs[0] if batch])
    assert len({tuple(mask.tolist()) for mask in masks}) > 3


@pytest.mark.slow
def test_dataloader_spawned_workers_count_skips_in_the_parent(messy_folder):
    raw, image_column = load_image_datasets(train_dir=str(messy_folder / "train"), streaming=False)
    skipped = SkippedImageCounter()
    train = apply_transform(raw["train"], image_column, TwoViewTransform(small_processor()), skipped=skipped)
    # One spawned worker suffices to show the shared count survives spawning (each takes seconds to import).
    batches = list(_loader(train, seed=0, num_workers=1, multiprocessing_context="spawn"))
    assert skipped.value == 3
    assert sum(len(batch.get("pixel_values", [])) for batch in batches) == 6


def test_center_crop_view_is_the_papers_evaluation_crop():
    # A 400x200 photo whose left quarter is white: resized whole, a quarter of the view is white; BEiT's evaluation
    # crop (shorter side to 256, centre 224) leaves none of it.
    pixels = np.zeros((200, 400, 3), dtype=np.uint8)
    pixels[:, :100] = 255
    image = Image.fromarray(pixels)
    whole = MimImageProcessor(do_normalize=False)
    cropped = center_crop_view(whole)
    assert cropped.size == {"shortest_edge": 256} and cropped.crop_size == {"height": 224, "width": 224}
    assert cropped.output_size == (224, 224)
    white = {name: float((view(image, return_tensors="pt")["pixel_values"][0, 0] > 0.99).float().mean())
             for name, view in (("whole", whole), ("cropped", cropped))}  # fmt: skip
    assert white["whole"] == pytest.approx(0.25, abs=0.01) and white["cropped"] == 0.0
    # Already cropping: unchanged. At 384 px and more BEiT (as timm) crops without a margin (crop_pct 1.0): the
    # shorter side to the size, the centre square; it squashed the whole image into the square.
    assert center_crop_view(cropped) is cropped
    large = center_crop_view(MimImageProcessor(size={"height": 384, "width": 384}, do_normalize=False))
    assert large.size == {"shortest_edge": 384} and large.crop_size == {"height": 384, "width": 384}
    white_large = float((large(image, return_tensors="pt")["pixel_values"][0, 0] > 0.99).float().mean())
    assert white_large == 0.0


@pytest.mark.parametrize("size", [(640, 427), (639, 427), (427, 640)])
def test_centre_crops_sit_where_torchvisions_centercrop_puts_them(size):
    # Resize(256) of 640x427 gives 383x256: a margin of 159, torchvision crops from round(79.5) = 80, transformers'
    # own crop from 79.
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    view = center_crop_view(MimImageProcessor(do_normalize=False))(image, return_tensors="np")["pixel_values"][0]
    short = 256
    resized_size = (short, int(short * size[1] / size[0])) if size[0] < size[1] else (int(short * size[0] / size[1]), short)
    resized = image.resize(resized_size, Image.Resampling.BICUBIC)
    left, top = (int(round((side - 224) / 2.0)) for side in resized.size)
    expected = np.asarray(resized.crop((left, top, left + 224, top + 224)), dtype=np.float32).transpose(2, 0, 1) / 255
    np.testing.assert_allclose(view, expected, atol=1e-6)


def test_evaluation_views_are_the_papers_centre_crops_of_one_region():
    """Resize(256) + CenterCrop(224) for the ViT's view and the same centre region for the tokenizer's 112 px view."""
    processor, tokenizer_processor = small_processor(), DvaeImageProcessor()
    transform = TwoViewTransform.for_evaluation(processor, tokenizer_processor)
    image = gradient_image(60, 90)
    outputs = transform(image)
    expected = {
        "pixel_values": center_crop_view(processor)(image, return_tensors="pt")["pixel_values"][0],
        "tokenizer_pixel_values": center_crop_view(tokenizer_processor)(image, return_tensors="pt")["pixel_values"][0],
    }
    assert set(outputs) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(outputs[key], value)
    squashed = TwoViewTransform(processor, tokenizer_processor, train=False)(image)
    assert not torch.allclose(squashed["pixel_values"], outputs["pixel_values"], atol=1e-2)
    assert transform(image)["pixel_values"].equal(outputs["pixel_values"])  # deterministic


def test_a_split_of_a_dataset_that_has_a_validation_split_is_refused(tmp_path):
    # A dataset folder with train/ and validation/ splits, as a Hub dataset would have them.
    write_images(tmp_path / "train", 4)
    write_images(tmp_path / "validation", 2)
    raw, _ = load_image_datasets(dataset_name=str(tmp_path))
    assert set(raw) == {"train", "validation"}
    with pytest.raises(UsageError, match="has a validation split, so --train_val_split would not be used: remove it"):
        load_image_datasets(dataset_name=str(tmp_path), train_val_split=0.25)


def test_a_class_folder_without_images_is_named_in_a_warning(tmp_path, caplog):
    # The imagefolder made no class of it, without a word: the classifier's head silently lacked that class.
    train = _class_folders(tmp_path / "train", ["cats", "dogs"])
    (tmp_path / "train" / "birds" / "empty").mkdir(parents=True)
    (tmp_path / "train" / "fish").mkdir()
    (tmp_path / "train" / "fish" / "notes.txt").write_text("no images here")
    with caplog.at_level(logging.WARNING, logger="hf_mim.data.datasets"):
        raw, _ = load_image_datasets(train_dir=train, class_folders=True)
    assert raw["train"].features["label"].names == ["cats", "dogs"]
    assert f"--train_dir {train}: the folders ['birds', 'fish'] hold no images, so no class is read from them" in [
        record.getMessage() for record in caplog.records
    ]
