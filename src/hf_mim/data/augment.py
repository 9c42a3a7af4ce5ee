"""RandAugment and random erasing of BEiT's fine-tuning recipe, without torchvision.

BEiT and BEiT v2 fine-tune with timm's `rand-m9-mstd0.5-inc1` RandAugment and random erasing
(`--reprob 0.25 --remode pixel --recount 1`) on top of the random-resized crop and flip. Both
follow timm's semantics, but every random draw comes from the per-example numpy Generator passed
to each call (never from Python's, numpy's or torch's global state), so a resumed run redraws
exactly the same augmentations.
"""

import math
import re

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps


# Magnitudes are on timm's 0-10 scale; each op maps 10 to its strongest setting.
MAX_MAGNITUDE = 10.0
# timm draws its op at this probability inside RandAugment (not configurable in its config string).
_OP_PROB = 0.5
# BEiT fine-tunes with `--train_interpolation bicubic`, which timm's RandAugment also uses for its geometric ops.
_RESAMPLE = Image.Resampling.BICUBIC


def _signed(value: float, rng: np.random.Generator) -> float:
    return -value if rng.random() < 0.5 else value


def _affine(image: Image.Image, coefficients: tuple, fill: tuple[int, int, int]) -> Image.Image:
    return image.transform(image.size, Image.Transform.AFFINE, coefficients, resample=_RESAMPLE, fillcolor=fill)


def _lookup(image: Image.Image, table: list[int]) -> Image.Image:
    return image.point(table * len(image.getbands()))


def _auto_contrast(image, magnitude, rng, fill):
    return ImageOps.autocontrast(image)


def _equalize(image, magnitude, rng, fill):
    return ImageOps.equalize(image)


def _invert(image, magnitude, rng, fill):
    return ImageOps.invert(image)


def _rotate(image, magnitude, rng, fill):
    return image.rotate(_signed(magnitude / MAX_MAGNITUDE * 30.0, rng), resample=_RESAMPLE, fillcolor=fill)


def _posterize_increasing(image, magnitude, rng, fill):
    # Keeps 4 bits at magnitude 0 down to 0 (black) at 10; PIL's own posterize refuses 0 bits, so a table does it.
    bits = 4 - int(magnitude / MAX_MAGNITUDE * 4)
    mask = 0xFF ^ (0xFF >> bits)
    return _lookup(image, [value & mask for value in range(256)])


def _solarize_increasing(image, magnitude, rng, fill):
    return ImageOps.solarize(image, 256 - int(magnitude / MAX_MAGNITUDE * 256))


def _solarize_add(image, magnitude, rng, fill):
    add = int(magnitude / MAX_MAGNITUDE * 110)
    return _lookup(image, [min(255, value + add) if value < 128 else value for value in range(256)])


def _enhance_increasing(enhancer):
    def enhance(image, magnitude, rng, fill):
        # 1 leaves the image unchanged; the factor moves away from it either way, and never below 0.1.
        factor = max(0.1, 1.0 + _signed(magnitude / MAX_MAGNITUDE * 0.9, rng))
        return enhancer(image).enhance(factor)

    return enhance


def _shear_x(image, magnitude, rng, fill):
    return _affine(image, (1, _signed(magnitude / MAX_MAGNITUDE * 0.3, rng), 0, 0, 1, 0), fill)


def _shear_y(image, magnitude, rng, fill):
    return _affine(image, (1, 0, 0, _signed(magnitude / MAX_MAGNITUDE * 0.3, rng), 1, 0), fill)


def _translate_x_rel(image, magnitude, rng, fill):
    return _affine(image, (1, 0, _signed(magnitude / MAX_MAGNITUDE * 0.45, rng) * image.width, 0, 1, 0), fill)


def _translate_y_rel(image, magnitude, rng, fill):
    return _affine(image, (1, 0, 0, 0, 1, _signed(magnitude / MAX_MAGNITUDE * 0.45, rng) * image.height), fill)


# timm's `_RAND_INCREASING_TRANSFORMS` (the `inc1` set), in its order. Each op is
# `op(image, magnitude, rng, fill) -> image`; signed ops draw their sign from `rng`.
RAND_AUGMENT_OPS = {
    "AutoContrast": _auto_contrast,
    "Equalize": _equalize,
    "Invert": _invert,
    "Rotate": _rotate,
    "PosterizeIncreasing": _posterize_increasing,
    "SolarizeIncreasing": _solarize_increasing,
    "SolarizeAdd": _solarize_add,
    "ColorIncreasing": _enhance_increasing(ImageEnhance.Color),
    "ContrastIncreasing": _enhance_increasing(ImageEnhance.Contrast),
    "BrightnessIncreasing": _enhance_increasing(ImageEnhance.Brightness),
    "SharpnessIncreasing": _enhance_increasing(ImageEnhance.Sharpness),
    "ShearX": _shear_x,
    "ShearY": _shear_y,
    "TranslateXRel": _translate_x_rel,
    "TranslateYRel": _translate_y_rel,
}

_CONFIG_EXAMPLE = "e.g. 'rand-m9-mstd0.5-inc1' (BEiT's recipe)"


def parse_rand_augment(config: str) -> dict:
    """The `RandAugment` arguments of a timm RandAugment string such as `rand-m9-mstd0.5-inc1`.

    Sections after `rand`, in any order: `m` magnitude (integer 0-10, default 10), `n` ops per
    image (default 2), `mstd` standard deviation of the magnitude's noise (default 0; above 100 the
    magnitude is uniform in [0, m], as in timm) and `inc1`, the increasing op set, which is the only
    one implemented. Anything else raises a `ValueError` naming it.
    """
    if not isinstance(config, str):
        raise TypeError(f"The RandAugment config must be a string ({_CONFIG_EXAMPLE}), got {type(config).__name__}")
    name, *sections = config.split("-")
    if name != "rand":
        raise ValueError(f"The RandAugment config {config!r} must start with 'rand' ({_CONFIG_EXAMPLE})")
    values = {}
    for section in sections:
        match = re.fullmatch(r"(mstd|m|n|inc)(\d+(?:\.\d*)?)", section)
        if match is None:
            raise ValueError(
                f"Unknown section {section!r} in the RandAugment config {config!r}: sections are m<int>, n<int>, "
                f"mstd<float> and inc1 ({_CONFIG_EXAMPLE})"
            )
        key, value = match.groups()
        if key in values:
            raise ValueError(f"Section {key!r} appears twice in the RandAugment config {config!r}")
        if key != "mstd" and not value.isdigit():
            raise ValueError(f"Section {section!r} of the RandAugment config {config!r} needs an integer")
        values[key] = float(value) if key == "mstd" else int(value)
    if values.get("inc") != 1:
        raise ValueError(
            f"The RandAugment config {config!r} must select the increasing op set with 'inc1' (timm's default op set, "
            f"whose magnitudes do not grow with m, is not implemented)"
        )
    magnitude_std = values.get("mstd", 0.0)
    return {
        "magnitude": values.get("m", int(MAX_MAGNITUDE)),
        "num_ops": values.get("n", 2),
        "magnitude_std": math.inf if magnitude_std > 100 else magnitude_std,
    }


class RandAugment:
    r"""timm's RandAugment with the increasing op set (`rand-m{M}-mstd{S}-inc1`) on 8-bit RGB PIL images.

    Per image, `num_ops` ops are chosen uniformly with replacement from `RAND_AUGMENT_OPS`; each is
    applied with probability 0.5 at a magnitude drawn from N(`magnitude`, `magnitude_std`) (uniform in
    [0, `magnitude`] if the std is infinite) and clipped to [0, 10]. Rotations, shears and
    translations are bicubic and fill uncovered pixels with `fill`.

    Args:
        magnitude (`float`, *optional*, defaults to 9): Mean magnitude, in [0, 10].
        magnitude_std (`float`, *optional*, defaults to 0.5): Its standard deviation; 0 fixes it.
        num_ops (`int`, *optional*, defaults to 2): Ops drawn per image.
        fill (`tuple[int, int, int]`, *optional*, defaults to `(124, 116, 104)`):
            Colour of uncovered pixels; timm uses the normalisation mean in 8 bits (this is ImageNet's).
    """

    def __init__(
        self,
        magnitude: float = 9,
        magnitude_std: float = 0.5,
        num_ops: int = 2,
        fill: tuple[int, int, int] = (124, 116, 104),
    ):
        if not 0 <= magnitude <= MAX_MAGNITUDE:
            raise ValueError(f"RandAugment magnitude must be in [0, {MAX_MAGNITUDE:g}], got {magnitude}")
        if not magnitude_std >= 0:
            raise ValueError(f"RandAugment magnitude_std must be >= 0 (0 fixes the magnitude), got {magnitude_std}")
        if isinstance(num_ops, bool) or not isinstance(num_ops, int) or num_ops < 1:
            raise ValueError(f"RandAugment num_ops must be a positive integer, got {num_ops!r}")
        fill = tuple(fill)
        if len(fill) != 3 or not all(isinstance(value, int) and 0 <= value <= 255 for value in fill):
            raise ValueError(f"RandAugment fill must be an 8-bit RGB colour such as (124, 116, 104), got {fill}")
        self.magnitude = magnitude
        self.magnitude_std = magnitude_std
        self.num_ops = num_ops
        self.fill = fill

    @classmethod
    def from_config(cls, config: str, fill: tuple[int, int, int] = (124, 116, 104)) -> "RandAugment":
        """RandAugment from a timm config string such as `rand-m9-mstd0.5-inc1` (see `parse_rand_augment`)."""
        return cls(**parse_rand_augment(config), fill=fill)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(magnitude={self.magnitude}, magnitude_std={self.magnitude_std}, "
            f"num_ops={self.num_ops}, fill={self.fill})"
        )

    def _draw_magnitude(self, rng: np.random.Generator) -> float:
        if self.magnitude_std == math.inf:
            magnitude = rng.uniform(0.0, self.magnitude)
        elif self.magnitude_std > 0:
            magnitude = rng.normal(self.magnitude, self.magnitude_std)
        else:
            magnitude = self.magnitude
        return float(min(max(magnitude, 0.0), MAX_MAGNITUDE))

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        if image.mode != "RGB":
            raise ValueError(
                f"RandAugment takes 8-bit RGB images, got mode {image.mode!r} (convert it with hf_mim's to_rgb)"
            )
        names = list(RAND_AUGMENT_OPS)
        for index in rng.integers(0, len(names), size=self.num_ops):
            if rng.random() < _OP_PROB:
                image = RAND_AUGMENT_OPS[names[index]](image, self._draw_magnitude(rng), rng, self.fill)
        return image


class RandomErasing:
    r"""timm's `RandomErasing` in 'pixel' mode with one rectangle, on a normalised `(C, H, W)` tensor.

    With probability `probability`, up to ten attempts draw an area fraction uniformly from
    `area_range` and an aspect ratio (height / width) log-uniformly from `aspect_range`; the first
    rectangle that fits strictly inside the image is replaced by standard normal noise, one value per
    pixel and channel (noise in normalised units, i.e. plausible random pixels). The input is not modified.

    Args:
        probability (`float`, *optional*, defaults to 0.25): Probability of erasing a rectangle.
        area_range (`tuple[float, float]`, *optional*, defaults to `(0.02, 1/3)`): Its area as a fraction of the image.
        aspect_range (`tuple[float, float]`, *optional*, defaults to `(0.3, 1/0.3)`): Its aspect ratio.
    """

    def __init__(
        self,
        probability: float = 0.25,
        area_range: tuple[float, float] = (0.02, 1 / 3),
        aspect_range: tuple[float, float] = (0.3, 1 / 0.3),
    ):
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"Random erasing probability must be in [0, 1], got {probability}")
        if not 0 < area_range[0] <= area_range[1] <= 1:
            raise ValueError(f"Random erasing area_range must be (min, max) with 0 < min <= max <= 1, got {area_range}")
        if not 0 < aspect_range[0] <= aspect_range[1]:
            raise ValueError(f"Random erasing aspect_range must be (min, max) with 0 < min <= max, got {aspect_range}")
        self.probability = probability
        self.area_range = tuple(area_range)
        self.aspect_range = tuple(aspect_range)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(probability={self.probability}, area_range={self.area_range}, "
            f"aspect_range={self.aspect_range})"
        )

    def __call__(self, pixel_values: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        if pixel_values.ndim != 3 or not pixel_values.is_floating_point():
            raise ValueError(
                f"Random erasing takes one normalised float image of shape (channels, height, width), got a "
                f"{pixel_values.dtype} tensor of shape {tuple(pixel_values.shape)}"
            )
        if rng.random() >= self.probability:
            return pixel_values
        channels, height, width = pixel_values.shape
        log_aspect = (math.log(self.aspect_range[0]), math.log(self.aspect_range[1]))
        for _ in range(10):
            target_area = rng.uniform(*self.area_range) * height * width
            aspect = math.exp(rng.uniform(*log_aspect))
            erase_height = int(round(math.sqrt(target_area * aspect)))
            erase_width = int(round(math.sqrt(target_area / aspect)))
            if erase_height < height and erase_width < width:
                top = int(rng.integers(0, height - erase_height + 1))
                left = int(rng.integers(0, width - erase_width + 1))
                noise = rng.standard_normal((channels, erase_height, erase_width), dtype=np.float32)
                erased = pixel_values.clone()
                erased[:, top : top + erase_height, left : left + erase_width] = torch.from_numpy(noise)
                return erased
        return pixel_values


__all__ = ["RAND_AUGMENT_OPS", "RandAugment", "RandomErasing", "parse_rand_augment"]
