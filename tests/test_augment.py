"""Tests of BEiT's fine-tuning augmentations: RandAugment (timm's `inc1` ops), random erasing and their hook."""

import hashlib
import math
import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image

from hf_mim.data import RAND_AUGMENT_OPS, RandAugment, RandomErasing, TwoViewTransform, parse_rand_augment
from hf_mim.models import DvaeImageProcessor, MimImageProcessor


FILL = (124, 116, 104)
SIGNED_OPS = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
ENHANCE_OPS = ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing")


def noise_image(width: int = 40, height: int = 32, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(int)


def apply(name: str, image: Image.Image, magnitude: float, seed: int = 0) -> np.ndarray:
    return pixels(RAND_AUGMENT_OPS[name](image, magnitude, np.random.default_rng(seed), FILL))


# ----------------------------------------------------------------------------------------------------- ops


def test_op_set_is_timms_increasing_set():
    assert list(RAND_AUGMENT_OPS) == [
        "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
        "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
        "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
    ]  # fmt: skip


def test_colour_ops_on_crafted_images():
    image = noise_image()
    np.testing.assert_array_equal(apply("Invert", image, 5), 255 - pixels(image))
    # AutoContrast and Equalize stretch a dull image ([60, 90] per channel) to the full range.
    dull = Image.fromarray((60 + pixels(image) * 30 // 255).astype(np.uint8))
    for name in ("AutoContrast", "Equalize"):
        out = apply(name, dull, 5)
        assert out.min() <= 10 and out.max() >= 245, name
    stretched = apply("AutoContrast", dull, 5)  # a monotone map of each channel
    assert (np.diff(stretched[..., 0].ravel()[np.argsort(pixels(dull)[..., 0], axis=None, kind="stable")]) >= 0).all()
    # Posterize keeps the 4 high bits at magnitude 0, 2 at 5 and none (black) at 10.
    for magnitude, bits in ((0, 4), (5, 2), (10, 0)):
        out = apply("PosterizeIncreasing", image, magnitude)
        np.testing.assert_array_equal(out, pixels(image) & (0xFF ^ (0xFF >> bits)))
        assert len(np.unique(out)) == 2**bits
    # Solarize inverts the pixels at or above 256 - 25.6 m.
    half = apply("SolarizeIncreasing", image, 5)
    source = pixels(image)
    np.testing.assert_array_equal(half, np.where(source >= 128, 255 - source, source))
    np.testing.assert_array_equal(apply("SolarizeIncreasing", image, 10), 255 - source)
    # SolarizeAdd adds 11 m to the pixels below 128.
    np.testing.assert_array_equal(apply("SolarizeAdd", image, 10), np.where(source < 128, source + 110, source))


def test_enhance_ops_move_the_factor_either_way_from_one():
    gray = Image.new("RGB", (16, 16), (100, 100, 100))
    brightness = {apply("BrightnessIncreasing", gray, 10, seed)[0, 0, 0] for seed in range(20)}
    assert brightness == {10, 190}  # factor 1 -/+ 0.9
    colourful = noise_image()
    faded = [apply("ColorIncreasing", colourful, 10, seed) for seed in range(20)]
    spreads = sorted(float(np.std(out, axis=2).mean()) for out in faded)
    original = float(np.std(pixels(colourful), axis=2).mean())
    assert spreads[0] < 0.2 * original and spreads[-1] > 1.2 * original


def test_rotate_fills_the_corners_with_the_mean_colour():
    image = Image.new("RGB", (32, 32), (10, 200, 30))
    angles = set()
    for seed in range(10):
        out = apply("Rotate", image, 10, seed)  # 30 degrees one way or the other
        for corner in (out[0, 0], out[0, -1], out[-1, 0], out[-1, -1]):
            np.testing.assert_array_equal(corner, FILL)
        np.testing.assert_array_equal(out[12:20, 12:20], np.broadcast_to([10, 200, 30], (8, 8, 3)))
        # The sign shows in which way the top edge's fill region leans.
        angles.add(bool((out[0, :16] == FILL).all(axis=1).sum() > (out[0, 16:] == FILL).all(axis=1).sum()))
    assert angles == {True, False}


def test_translate_and_shear_move_content_and_fill_the_rest():
    image = noise_image(40, 40)
    source = pixels(image)
    shifts = set()
    for seed in range(10):
        out = apply("TranslateXRel", image, 10, seed)  # 0.45 x 40 = 18 pixels left or right
        if (out[:, :18] == FILL).all():
            np.testing.assert_array_equal(out[:, 18:], source[:, :22])
            shifts.add("right")
        else:
            np.testing.assert_array_equal(out[:, :22], source[:, 18:])
            assert (out[:, 22:] == FILL).all()
            shifts.add("left")
        vertical = apply("TranslateYRel", image, 10, seed)
        assert (vertical[:18] == FILL).all() or (vertical[22:] == FILL).all()
    assert shifts == {"left", "right"}
    # ShearX slides each row of a striped image sideways by 0.3 x its height (ShearY: columns): the row keeps
    # its colour, the part it slid away from is filled, and the filled part grows steadily down the image.
    stripes = np.zeros((40, 40, 3), dtype=np.uint8)
    stripes[...] = np.stack([np.arange(40) * 6, 255 - np.arange(40) * 6, np.full(40, 50)], axis=1)[:, None]
    for name, transpose in (("ShearX", False), ("ShearY", True)):
        source = stripes.transpose(1, 0, 2) if transpose else stripes
        for seed in range(4):
            out = apply(name, Image.fromarray(np.ascontiguousarray(source)), 10, seed)
            out, rows = (out.transpose(1, 0, 2), stripes) if transpose else (out, stripes)
            filled = (out == FILL).all(axis=2)
            kept = (out == rows).all(axis=2)
            assert ((~filled & ~kept).sum(axis=1) <= 3).all(), name  # only the blended edge is neither
            counts = filled.sum(axis=1)
            assert (np.diff(counts) >= 0).all() or (np.diff(counts) <= 0).all(), name
            assert max(counts[0], counts[-1]) >= 10 and min(counts[0], counts[-1]) == 0, name


@pytest.mark.parametrize(
    "name",
    ["Rotate", "SolarizeIncreasing", "SolarizeAdd", *ENHANCE_OPS, "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"],
)
def test_magnitude_zero_is_the_identity(name):
    image = noise_image()
    for seed in range(3):
        np.testing.assert_array_equal(apply(name, image, 0, seed), pixels(image))
    assert not np.array_equal(apply(name, image, 10), pixels(image))


def test_ops_grow_with_magnitude():
    # Geometric ops move a smooth image (noise decorrelates at any angle); the others change noise.
    smooth = np.zeros((48, 48, 3), dtype=np.uint8)
    smooth[..., 0], smooth[..., 1] = np.arange(48)[None, :] * 5, np.arange(48)[:, None] * 5
    for name in RAND_AUGMENT_OPS:
        if name in ("AutoContrast", "Equalize", "Invert"):
            continue
        image = Image.fromarray(smooth) if name in SIGNED_OPS else noise_image(48, 48)
        changes = [np.abs(apply(name, image, magnitude) - pixels(image)).mean() for magnitude in (0, 3, 6, 10)]
        assert changes == sorted(changes) and changes[-1] > changes[0], (name, changes)


# ------------------------------------------------------------------------------------------- RandAugment


def record_ops(monkeypatch) -> list[tuple[str, float]]:
    calls = []

    def recorder(name):
        def op(image, magnitude, rng, fill):
            calls.append((name, magnitude))
            return image

        return op

    for name in RAND_AUGMENT_OPS:
        monkeypatch.setitem(RAND_AUGMENT_OPS, name, recorder(name))
    return calls


def test_rand_augment_draws_two_ops_each_at_half_probability_with_noisy_magnitudes(monkeypatch):
    calls = record_ops(monkeypatch)
    augment = RandAugment.from_config("rand-m9-mstd0.5-inc1")
    image = noise_image(8, 8)
    images = 2000
    for seed in range(images):
        augment(image, np.random.default_rng(seed))
    assert abs(len(calls) / images - 1.0) < 0.05  # 2 ops x probability 0.5
    counts = {name: sum(call[0] == name for call in calls) for name in RAND_AUGMENT_OPS}
    assert min(counts.values()) > 0.5 * len(calls) / len(RAND_AUGMENT_OPS)
    magnitudes = np.array([magnitude for _, magnitude in calls])
    assert magnitudes.min() >= 0 and magnitudes.max() == 10  # N(9, 0.5) clipped at 10
    assert abs(magnitudes.mean() - 9) < 0.05 and 0.4 < magnitudes.std() < 0.5
    calls.clear()
    for seed in range(200):
        RandAugment.from_config("rand-m7-n3-inc1")(image, np.random.default_rng(seed))
    assert {magnitude for _, magnitude in calls} == {7} and abs(len(calls) / 200 - 1.5) < 0.25
    calls.clear()
    for seed in range(500):
        RandAugment.from_config("rand-m6-mstd101-inc1")(image, np.random.default_rng(seed))
    magnitudes = np.array([magnitude for _, magnitude in calls])  # uniform in [0, 6]
    assert magnitudes.min() < 0.3 and 5.7 < magnitudes.max() <= 6 and abs(magnitudes.mean() - 3) < 0.3


def test_rand_augment_is_a_function_of_its_rng_alone():
    augment = RandAugment.from_config("rand-m9-mstd0.5-inc1")
    image = noise_image()
    outputs = []
    for seed in range(20):
        first = pixels(augment(image, np.random.default_rng(seed)))
        # Global random state (Python, numpy, torch) plays no part.
        random.seed(seed + 1)
        np.random.seed(seed + 2)
        torch.manual_seed(seed + 3)
        np.testing.assert_array_equal(pixels(augment(image, np.random.default_rng(seed))), first)
        outputs.append(first.tobytes())
    assert len(set(outputs)) >= 15  # a quarter of the images get no op at all
    with pytest.raises(ValueError, match="RGB"):
        augment(image.convert("L"), np.random.default_rng(0))


@pytest.mark.parametrize(
    "config, expected",
    [
        ("rand-m9-mstd0.5-inc1", {"magnitude": 9, "num_ops": 2, "magnitude_std": 0.5}),
        ("rand-inc1-n3-m5", {"magnitude": 5, "num_ops": 3, "magnitude_std": 0.0}),
        ("rand-inc1", {"magnitude": 10, "num_ops": 2, "magnitude_std": 0.0}),
        ("rand-m9-mstd101-inc1", {"magnitude": 9, "num_ops": 2, "magnitude_std": math.inf}),
    ],
)
def test_parse_rand_augment(config, expected):
    assert parse_rand_augment(config) == expected


@pytest.mark.parametrize(
    "config, error",
    [
        ("", "must start with 'rand'"),
        ("augmix-m9-inc1", "must start with 'rand'"),
        ("rand-m9-mstd0.5", "inc1"),
        ("rand-m9-mstd0.5-inc0", "inc1"),
        ("rand-m9-mstd0.5-inc1-w0", "Unknown section 'w0'"),
        ("rand-m9--inc1", "Unknown section ''"),
        ("rand-mx-inc1", "Unknown section 'mx'"),
        ("rand-m9-m8-inc1", "appears twice"),
        ("rand-m9.5-inc1", "needs an integer"),
        ("rand-m11-inc1", "magnitude must be in"),
        ("rand-n0-inc1", "num_ops"),
        ("RAND-m9-inc1", "must start with 'rand'"),
    ],
)
def test_malformed_rand_augment_configs_raise(config, error):
    with pytest.raises(ValueError, match=error):
        RandAugment.from_config(config)


def test_rand_augment_rejects_bad_arguments():
    with pytest.raises(TypeError, match="string"):
        parse_rand_augment(9)
    with pytest.raises(ValueError, match="magnitude_std"):
        RandAugment(magnitude_std=-1)
    with pytest.raises(ValueError, match="fill"):
        RandAugment(fill=(0.5, 0.5, 0.5))


# ---------------------------------------------------------------------------------------- random erasing


def test_random_erasing_replaces_one_rectangle_with_noise():
    erasing = RandomErasing(probability=1.0)
    source = torch.full((3, 40, 48), 7.0)
    areas, aspects, noise = [], [], []
    for seed in range(300):
        out = erasing(source, np.random.default_rng(seed))
        changed = (out != 7.0).any(dim=0)
        rows, cols = changed.any(dim=1).nonzero()[:, 0], changed.any(dim=0).nonzero()[:, 0]
        top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        # Exactly a rectangle, every channel of it erased; nothing else touched.
        assert changed[top:bottom, left:right].all() and changed.sum() == (bottom - top) * (right - left)
        assert (out[:, top:bottom, left:right] != 7.0).all()
        areas.append(float((bottom - top) * (right - left)) / (40 * 48))
        aspects.append(float(bottom - top) / float(right - left))
        noise.append(out[:, top:bottom, left:right].flatten())
    assert 0.02 * 0.8 <= min(areas) < 0.04 and 0.3 < max(areas) <= 1 / 3 * 1.15
    assert min(aspects) < 0.45 and max(aspects) > 2.2
    values = torch.cat(noise)
    assert abs(values.mean()) < 0.01 and abs(values.std() - 1) < 0.01
    assert torch.equal(source, torch.full((3, 40, 48), 7.0))  # the input is left alone


def test_random_erasing_probability_and_rng():
    source = torch.zeros(3, 16, 16)
    erased = sum(
        not torch.equal(RandomErasing(0.25)(source, np.random.default_rng(seed)), source) for seed in range(1000)
    )
    assert 200 < erased < 300
    assert all(torch.equal(RandomErasing(0.0)(source, np.random.default_rng(seed)), source) for seed in range(50))
    erasing = RandomErasing(1.0)
    first = erasing(source, np.random.default_rng(3))
    torch.manual_seed(1)
    np.random.seed(1)
    assert torch.equal(erasing(source, np.random.default_rng(3)), first)
    assert not torch.equal(erasing(source, np.random.default_rng(4)), first)


def test_random_erasing_rejects_bad_arguments():
    for kwargs, error in (
        ({"probability": 1.5}, "probability"),
        ({"area_range": (0.5, 0.1)}, "area_range"),
        ({"aspect_range": (0.0, 3.0)}, "aspect_range"),
    ):
        with pytest.raises(ValueError, match=error):
            RandomErasing(**kwargs)
    with pytest.raises(ValueError, match="channels, height, width"):
        RandomErasing(1.0)(torch.zeros(2, 3, 8, 8), np.random.default_rng(0))
    with pytest.raises(ValueError, match="float"):
        RandomErasing(1.0)(torch.zeros(3, 8, 8, dtype=torch.uint8), np.random.default_rng(0))


# ----------------------------------------------------------------------------------------- TwoViewTransform


def golden_image() -> Image.Image:
    array = np.random.default_rng(123).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    array[..., 0] = np.arange(70)[None, :] * 3
    return Image.fromarray(array)


def golden_transforms(**options) -> dict[str, TwoViewTransform]:
    vit = MimImageProcessor(size={"height": 32, "width": 32})
    return {
        "dvae": TwoViewTransform(vit, DvaeImageProcessor(size={"height": 16, "width": 16}), **options),
        "same-size": TwoViewTransform(
            vit,
            MimImageProcessor(size={"height": 32, "width": 32}, do_normalize=False),
            crop_scale=(0.2, 1.0),
            **options,
        ),
        "single": TwoViewTransform(vit, hflip_prob=1.0, color_jitter=0.0, **options),
    }


# SHA-256 of the views (and of the rng's next draw) for seeds 0-3, from TwoViewTransform(exact=True) as it renders
# torchvision's resized_crop (the crop resampled alone, since 028ea50; until then PIL's resize(box=...) read pixels
# around the crop, and these digests were those of commit 379cb2d, before RandAugment and random erasing existed):
# without the options, `exact=True` keeps rendering them bit for bit.
GOLDEN_DIGESTS = {
    "dvae": "8700e7b6a998a7f6d575fdb545b28c9b9739a8f2c019931145def29a564079d0",
    "same-size": "90f498b7863591a119ee1eae947c21140c8660afcb8092ed98daaa92bdc3441d",
    "single": "8e4fc848f158323cb31628bf999189c3175bc45b194401b81acaf5e28e18fb95",
}


@pytest.mark.parametrize("options", [{}, {"rand_augment": None, "random_erasing": 0.0}])
def test_transform_without_the_options_is_unchanged(options):
    for name, transform in golden_transforms(exact=True, **options).items():
        digest = hashlib.sha256()
        for seed in range(4):
            rng = np.random.default_rng(seed)
            views = transform(golden_image(), rng=rng)
            for key in sorted(views):
                digest.update(key.encode())
                digest.update(views[key].numpy().tobytes())
            digest.update(np.float64(rng.random()).tobytes())
        assert digest.hexdigest() == GOLDEN_DIGESTS[name], name


@pytest.mark.parametrize("options", [{"rand_augment": "rand-m9-mstd0.5-inc1"}, {"random_erasing": 1.0}])
def test_options_augment_the_vit_view_only(options):
    changed = 0
    for name, plain in golden_transforms().items():
        augmented = golden_transforms(**options)[name]
        for seed in range(8):
            before = plain(golden_image(), rng=np.random.default_rng(seed))
            after = augmented(golden_image(), rng=np.random.default_rng(seed))
            assert after.keys() == before.keys()
            if "tokenizer_pixel_values" in before:
                assert torch.equal(after["tokenizer_pixel_values"], before["tokenizer_pixel_values"])
            changed += not torch.equal(after["pixel_values"], before["pixel_values"])
            again = augmented(golden_image(), rng=np.random.default_rng(seed))
            assert all(torch.equal(again[key], after[key]) for key in after)
    assert changed >= 16


def test_transform_options_follow_the_recipe_and_survive_pickling():
    transform = TwoViewTransform(
        MimImageProcessor(size={"height": 32, "width": 32}), rand_augment="rand-m9-mstd0.5-inc1", random_erasing=0.25
    )
    assert transform.rand_augment.fill == FILL  # ImageNet's mean in 8 bits, as timm
    assert (transform.rand_augment.magnitude, transform.rand_augment.magnitude_std) == (9, 0.5)
    assert transform.random_erasing.probability == 0.25
    assert "rand_augment=RandAugment(magnitude=9" in repr(transform) and "probability=0.25" in repr(transform)
    inception = MimImageProcessor(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    assert TwoViewTransform(inception, rand_augment="rand-inc1").rand_augment.fill == (128, 128, 128)
    copy = pickle.loads(pickle.dumps(transform))
    for seed in range(5):
        expected = transform(golden_image(), rng=np.random.default_rng(seed))["pixel_values"]
        assert torch.equal(copy(golden_image(), rng=np.random.default_rng(seed))["pixel_values"], expected)
    # Evaluation stays the processor's deterministic preprocessing.
    view = transform.views["pixel_values"]
    evaluation = TwoViewTransform(view, rand_augment="rand-inc1", random_erasing=1.0, train=False)
    torch.testing.assert_close(
        evaluation(golden_image())["pixel_values"],
        view(golden_image(), return_tensors="pt")["pixel_values"][0],
    )


def test_transform_without_rand_augment_needs_no_normalisation_mean():
    # Worked before RandAugment existed (commit 379cb2d): the fill is only computed for RandAugment.
    raw = MimImageProcessor(size={"height": 32, "width": 32}, image_mean=None, image_std=None, do_normalize=False)
    views = TwoViewTransform(raw)(golden_image(), rng=np.random.default_rng(0))
    assert views["pixel_values"].shape == (3, 32, 32)
    assert TwoViewTransform(raw, train=False)(golden_image())["pixel_values"].shape == (3, 32, 32)


@pytest.mark.parametrize(
    "processor, fill",
    [
        # No mean to take the colour from: timm's grey.
        (MimImageProcessor(image_mean=None, image_std=None, do_normalize=False), (128, 128, 128)),
        (MimImageProcessor(do_normalize=False), (128, 128, 128)),
        # The dVAE's mean of -0.125 has no 8-bit colour; black is the nearest.
        (DvaeImageProcessor(), (0, 0, 0)),
        (MimImageProcessor(image_mean=[-0.5, 0.5, 1.5], image_std=[1.0, 1.0, 1.0]), (0, 128, 255)),
    ],
)
def test_rand_augment_fill_is_an_8_bit_colour_for_every_processor(processor, fill):
    transform = TwoViewTransform(processor, rand_augment="rand-m9-mstd0.5-inc1")
    assert transform.rand_augment.fill == fill
    views = transform(golden_image(), rng=np.random.default_rng(0))
    assert views["pixel_values"].shape == (3, *processor.output_size)


def test_random_erasing_needs_a_normalised_view():
    raw = MimImageProcessor(size={"height": 32, "width": 32}, do_normalize=False)
    with pytest.raises(ValueError, match="random_erasing=0.25 needs a normalised ViT view.*do_normalize=False"):
        TwoViewTransform(raw, random_erasing=0.25)
    assert TwoViewTransform(raw, random_erasing=0.0).random_erasing is None


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"rand_augment": "rand-m9"}, "inc1"),
        ({"random_erasing": 1.5}, "probability"),
        ({"random_erasing": -0.1}, "probability"),
    ],
)
def test_transform_rejects_bad_options(kwargs, error):
    with pytest.raises(ValueError, match=error):
        TwoViewTransform(MimImageProcessor(), **kwargs)
