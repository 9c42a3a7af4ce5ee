"""BEiT's two-view pre-training transform, without torchvision.

One augmented crop of an image is rendered twice: once for the ViT and once for the visual
tokenizer (e.g. 224 px bicubic and 112 px Lanczos for BEiT v1 with the DALL-E dVAE), so the
tokenizer's targets describe exactly the pixels the ViT sees. Sizes, interpolation and
normalisation of each view come from that model's image processor (`MimImageProcessor` and
subclasses), which keeps `preprocessor_config.json` the single source of truth for a view.
"""

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageStat

from ..models.image_processing_mim import MimImageProcessor, to_rgb
from .augment import RandAugment, RandomErasing
from .masking import numpy_rng_from_torch
from .resampling import lanczos_resize


# torchvision's ColorJitter on PIL images uses exactly these enhancers (hue is never jittered here).
_JITTER_ENHANCERS = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
# timm's RandAugment fill (`_FILL`) when it is given no normalisation mean.
_TIMM_DEFAULT_FILL = (128, 128, 128)
# PIL's "L" conversion (ITU-R 601-2 luma), which ImageEnhance.Color and Contrast blend towards.
_LUMA = (0.299, 0.587, 0.114)
# The papers' evaluation crop (timm's crop_pct): the shorter side resized to 256 for a 224 crop.
CENTER_CROP_FRACTION = 224 / 256
# BEiT (as timm, crop_pct 1.0) evaluates 384 px and larger views without a margin: the shorter side resized to the
# size, then the centre square.
FULL_CROP_SIZE = 384


def _interpolate(mode: str):
    def resize(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        # torch's 8-bit antialiased path wants (1, C, H, W) in channels-last memory, the layout of a PIL image's array.
        return F.interpolate(pixels[None], size=size, mode=mode, antialias=True)[0]

    return resize


# Filters torch renders as PIL's antialiased ones, from a (3, H, W) 8-bit crop to a (3, h, w) view in [0, 255], faster
# than PIL's resize; other filters (nearest, box, hamming) stay with PIL.
_TORCH_FILTERS = {
    Image.Resampling.BILINEAR: _interpolate("bilinear"),
    Image.Resampling.BICUBIC: _interpolate("bicubic"),
    Image.Resampling.LANCZOS: lanczos_resize,
}


def random_resized_crop_box(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: np.random.Generator,
) -> tuple[int, int, int, int]:
    """Sample a crop box `(top, left, crop_height, crop_width)` the way torchvision's `RandomResizedCrop` does.

    Ten attempts draw an area fraction uniformly from `scale` and an aspect ratio (width / height)
    log-uniformly from `ratio`; if none fits, fall back to the largest centred crop whose aspect
    ratio is within `ratio`.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_width = int(round(math.sqrt(target_area * aspect)))
        crop_height = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = int(rng.integers(0, height - crop_height + 1))
            left = int(rng.integers(0, width - crop_width + 1))
            return top, left, crop_height, crop_width
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_width, crop_height = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        crop_width, crop_height = int(round(height * max(ratio))), height
    else:
        crop_width, crop_height = width, height
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


def center_crop_view(processor: MimImageProcessor, crop_fraction: float = CENTER_CROP_FRACTION) -> MimImageProcessor:
    """`processor`'s view as the papers evaluate and sample images: the shorter side resized to
    floor(size / `crop_fraction`), then the centre size x size crop (Resize(256) + CenterCrop(224): BEiT's fine-tuning
    and linear-probe evaluation, CCViT's k-means fit); from 384 px on, the shorter side resized to the size itself
    (BEiT's crop_pct 1.0). A processor that already centre-crops is returned as it is."""
    height, width = processor.output_size
    if processor.do_center_crop:
        return processor
    if height >= FULL_CROP_SIZE:
        crop_fraction = 1.0
    if height != width:
        raise ValueError(f"Expected a processor of square images to centre-crop, got {height}x{width}")
    fields = processor.to_dict()
    fields.pop("image_processor_type", None)
    fields.update(
        size={"shortest_edge": math.floor(height / crop_fraction)}, crop_size={"height": height, "width": width},
        do_center_crop=True,
    )
    return type(processor)(**fields)


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """A float32 `(3, H, W)` tensor in [0, 1] from an 8-bit RGB image (torchvision's `ToTensor`)."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0))


class _Draws(NamedTuple):
    """One image's random draws: jitter order and factors (None without jitter), flip, crop box (top, left, h, w)."""

    jitter_order: np.ndarray | None
    jitter_factors: np.ndarray | None
    flip: bool
    box: tuple[int, int, int, int]


def _jitter_view(view: torch.Tensor, draws: _Draws, grey_mean: float) -> torch.Tensor:
    """torchvision's ColorJitter (brightness, contrast, saturation) on a float `(3, H, W)` view in [0, 1], in place.

    `grey_mean` ([`_contrast_mean`]) is what contrast blends towards: the whole image's mean luma, as when
    torchvision jitters the image before the crop.
    """
    # Each step blends towards a target, factor * view + (1 - factor) * target, in as few passes as it can.
    for index in draws.jitter_order:
        factor = float(draws.jitter_factors[index])
        if index == 2:
            # Saturation's target is each pixel's luma; (1 - factor) times it, summed channel by channel.
            red, green, blue = ((1.0 - factor) * luma for luma in _LUMA)
            grey = (view[0] * red).add_(view[1], alpha=green).add_(view[2], alpha=blue)
            view.mul_(factor).add_(grey)
        else:
            view.mul_(factor)
            if index == 1:
                view.add_((1.0 - factor) * grey_mean)
        view.clamp_(0.0, 1.0)
    return view


def _contrast_mean(image: Image.Image, draws: _Draws) -> float:
    """The luma mean PIL's Contrast blends towards when the jitter runs on the whole image, in [0, 1]: the image's,
    times the brightness factor when brightness comes first (exact up to clipping), rounded to 8 bits as PIL does."""
    mean = ImageStat.Stat(image.convert("L")).mean[0]
    order = list(draws.jitter_order)
    if order.index(0) < order.index(1):
        mean *= float(draws.jitter_factors[0])
    return min(int(mean + 0.5), 255) / 255.0


def _rand_augment_fill(image_processor: MimImageProcessor) -> tuple[int, int, int]:
    """timm's RandAugment fill for a view: its normalisation mean in 8 bits ((124, 116, 104) for ImageNet's), so
    uncovered pixels normalise to about 0; timm's grey (128, 128, 128) for a view without one.

    Each channel is clamped to [0, 255]: a mean outside [0, 1] (the dVAE's -0.125 maps [0, 1] into [0.1, 0.9]) has
    no 8-bit colour, and the nearest one is the closest the fill can get to it.
    """
    if not image_processor.do_normalize or image_processor.image_mean is None:
        return _TIMM_DEFAULT_FILL
    return tuple(min(255, max(0, round(255 * value))) for value in image_processor.image_mean)


def _check_processor(processor, name: str) -> None:
    if not isinstance(processor, MimImageProcessor):
        raise TypeError(
            f"{name} must be a MimImageProcessor (or a subclass such as a tokenizer's processor), got "
            f"{type(processor).__name__}; load it with AutoImageProcessor.from_pretrained(<hf_mim checkpoint>)"
        )


class TwoViewTransform:
    r"""BEiT's pre-training augmentation producing the ViT view and (optionally) the tokenizer view of one crop.

    Training mode, per image: convert to RGB, colour jitter (brightness, contrast and saturation
    factors uniform in [1 - `color_jitter`, 1 + `color_jitter`], applied in random order),
    horizontal flip, then one random-resized-crop box rendered at each processor's `output_size`
    with its `resample`, scaled to [0, 1] and normalised with its `normalize_tensor`. Fine-tuning
    adds BEiT's RandAugment (on the ViT's rendered crop) and random erasing (on its normalised
    tensor); both apply to the ViT's view only and are off by default, as in MIM pre-training.

    Evaluation mode (`train=False`): each view is the processor's own deterministic
    preprocessing (resize, optional centre crop), so validation losses are comparable across
    evaluations; [`TwoViewTransform.for_evaluation`] takes the papers' centre-crop views.

    Args:
        image_processor ([`MimImageProcessor`]):
            Processor of the ViT's view (`pixel_values`).
        tokenizer_image_processor ([`MimImageProcessor`], *optional*):
            Processor of the tokenizer's view (`tokenizer_pixel_values`); omit it for a single view.
        crop_scale (`tuple[float, float]`, *optional*, defaults to `(0.08, 1.0)`):
            Range of the crop's area as a fraction of the image (BEiT v2 / CCViT recipes use 0.2 as the minimum).
        crop_ratio (`tuple[float, float]`, *optional*, defaults to `(3/4, 4/3)`):
            Range of the crop's aspect ratio (width / height), sampled log-uniformly.
        hflip_prob (`float`, *optional*, defaults to 0.5):
            Probability of a horizontal flip.
        color_jitter (`float`, *optional*, defaults to 0.4):
            Strength of brightness, contrast and saturation jitter; 0 disables it.
        rand_augment (`str`, *optional*):
            A timm RandAugment config such as BEiT's fine-tuning `"rand-m9-mstd0.5-inc1"` (see
            `parse_rand_augment`); uncovered pixels take the ViT processor's mean colour, as in timm (grey
            (128, 128, 128) if it does not normalise).
            timm (hence BEiT's recipe) applies no colour jitter with RandAugment: pass `color_jitter=0` to match.
        random_erasing (`float`, *optional*, defaults to 0):
            Probability of erasing a rectangle of the ViT's view with noise (BEiT's fine-tuning: 0.25); 0 disables it.
            The noise is standard normal, so it needs a ViT processor that normalises (`do_normalize=True`).
        train (`bool`, *optional*, defaults to `True`):
            Random augmentation if True, the processors' deterministic preprocessing if False.
        exact (`bool`, *optional*, defaults to `False`):
            Render training views exactly as torchvision's PIL pipeline does (colour jitter on the whole 8-bit
            image, flip, then `resized_crop`: the crop alone resampled to each view). By default the same draws are
            rendered faster: only the crop is read, bicubic, bilinear and Lanczos views are resampled by torch with
            PIL's antialiased kernels (Lanczos in float, without PIL's 8-bit rounding), and the jitter runs in float
            on the rendered views, blending contrast towards the whole image's mean as torchvision does. Views differ
            from the exact ones by PIL's 8-bit rounding between jitter steps and resampling passes and clipping
            before versus after resampling (measured in benchmarks/README.md).
            RandAugment then runs on the ViT's view rounded to 8 bits.
    """

    def __init__(
        self,
        image_processor: MimImageProcessor,
        tokenizer_image_processor: MimImageProcessor | None = None,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip_prob: float = 0.5,
        color_jitter: float = 0.4,
        rand_augment: str | None = None,
        random_erasing: float = 0.0,
        train: bool = True,
        exact: bool = False,
    ):
        _check_processor(image_processor, "image_processor")
        if tokenizer_image_processor is not None:
            _check_processor(tokenizer_image_processor, "tokenizer_image_processor")
        if not 0 < crop_scale[0] <= crop_scale[1]:
            raise ValueError(f"crop_scale must be (min, max) with 0 < min <= max, got {crop_scale}")
        if not 0 < crop_ratio[0] <= crop_ratio[1]:
            raise ValueError(f"crop_ratio must be (min, max) with 0 < min <= max, got {crop_ratio}")
        if not 0.0 <= hflip_prob <= 1.0:
            raise ValueError(f"hflip_prob must be a probability in [0, 1], got {hflip_prob}")
        if color_jitter < 0:
            raise ValueError(f"color_jitter must be >= 0 (0 disables it), got {color_jitter}")
        self.views = {"pixel_values": image_processor}
        if tokenizer_image_processor is not None:
            self.views["tokenizer_pixel_values"] = tokenizer_image_processor
        self.crop_scale = tuple(crop_scale)
        self.crop_ratio = tuple(crop_ratio)
        self.hflip_prob = hflip_prob
        self.color_jitter = color_jitter
        self.rand_augment = None
        if rand_augment is not None:
            self.rand_augment = RandAugment.from_config(rand_augment, fill=_rand_augment_fill(image_processor))
        if random_erasing and not image_processor.do_normalize:
            raise ValueError(
                f"random_erasing={random_erasing} needs a normalised ViT view: its standard normal noise assumes "
                "mean/std-normalised pixels, but image_processor has do_normalize=False (its pixels are in [0, 1]); "
                "pass random_erasing=0 or a processor that normalises"
            )
        self.random_erasing = RandomErasing(random_erasing) if random_erasing else None
        self.train = train
        self.exact = exact

    def __repr__(self) -> str:
        views = ", ".join(
            f"{key}={processor.output_size[0]}x{processor.output_size[1]} "
            f"{Image.Resampling(int(processor.resample)).name.lower()}"
            for key, processor in self.views.items()
        )
        return (
            f"{type(self).__name__}({views}, crop_scale={self.crop_scale}, crop_ratio={self.crop_ratio}, "
            f"hflip_prob={self.hflip_prob}, color_jitter={self.color_jitter}, rand_augment={self.rand_augment}, "
            f"random_erasing={self.random_erasing}, train={self.train}, exact={self.exact})"
        )

    def _draw(self, width: int, height: int, rng: np.random.Generator) -> _Draws:
        order = factors = None
        if self.color_jitter:
            order = rng.permutation(len(_JITTER_ENHANCERS))
            low = max(0.0, 1.0 - self.color_jitter)
            factors = rng.uniform(low, 1.0 + self.color_jitter, size=len(_JITTER_ENHANCERS))
        flip = bool(rng.random() < self.hflip_prob)
        box = random_resized_crop_box(width, height, self.crop_scale, self.crop_ratio, rng)
        return _Draws(order, factors, flip, box)

    def _render_exact(self, image: Image.Image, draws: _Draws, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        if draws.jitter_order is not None:
            for index in draws.jitter_order:
                image = _JITTER_ENHANCERS[index](image).enhance(float(draws.jitter_factors[index]))
        if draws.flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        top, left, height, width = draws.box
        # torchvision's resized_crop: crop, then resample the crop alone (PIL's `box=` would read pixels around it).
        crop = image.crop((left, top, left + width, top + height))
        outputs, rendered = {}, {}
        for key, processor in self.views.items():
            out_height, out_width = processor.output_size
            resample = Image.Resampling(int(processor.resample))
            if key == "pixel_values" and self.rand_augment is not None:
                # timm's order: RandAugment on the cropped, flipped image at the ViT's size. Its view is its own.
                view = self.rand_augment(crop.resize((out_width, out_height), resample), rng)
                outputs[key] = processor.normalize_tensor(_to_tensor(view))
                continue
            # Views with the same size and filter (e.g. CCViT's two 224 bicubic views) are rendered once.
            if (out_height, out_width, resample) not in rendered:
                view = crop.resize((out_width, out_height), resample)
                rendered[out_height, out_width, resample] = _to_tensor(view)
            outputs[key] = processor.normalize_tensor(rendered[out_height, out_width, resample])
        return outputs

    def _render_fast(self, image: Image.Image, draws: _Draws, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        top, left, height, width = draws.box
        if draws.flip:
            # The box of the flipped image, in the unflipped one: each view is flipped after resampling instead.
            left = image.width - left - width
        grey_mean = _contrast_mean(image, draws) if draws.jitter_order is not None else None
        # Every view resamples the crop alone, as torchvision's resized_crop does.
        crop = image.crop((left, top, left + width, top + height))
        crop_tensor, outputs, rendered = None, {}, {}
        for key, processor in self.views.items():
            out_height, out_width = processor.output_size
            resample = Image.Resampling(int(processor.resample))
            if (out_height, out_width, resample) not in rendered:
                if resample in _TORCH_FILTERS:
                    if crop_tensor is None:
                        crop_tensor = torch.from_numpy(np.array(crop)).permute(2, 0, 1)
                    view = _TORCH_FILTERS[resample](crop_tensor, (out_height, out_width))
                else:
                    view = crop.resize((out_width, out_height), resample)
                    view = torch.from_numpy(np.array(view)).permute(2, 0, 1)
                if draws.flip:
                    view = view.flip(-1)
                view = view.float().div_(255.0)
                if grey_mean is not None:
                    view = _jitter_view(view, draws, grey_mean)
                rendered[out_height, out_width, resample] = view
            view = rendered[out_height, out_width, resample]
            if key == "pixel_values" and self.rand_augment is not None:
                # RandAugment works on 8-bit PIL images, as in timm; the tokenizer's view stays unaugmented.
                pixels = view.mul(255.0).round_().to(torch.uint8).permute(1, 2, 0).numpy()
                view = _to_tensor(self.rand_augment(Image.fromarray(pixels), rng))
            outputs[key] = processor.normalize_tensor(view)
        return outputs

    @classmethod
    def for_evaluation(
        cls, image_processor: MimImageProcessor, tokenizer_image_processor: MimImageProcessor | None = None
    ) -> "TwoViewTransform":
        """The deterministic views the papers evaluate on: each processor's [`center_crop_view`] (Resize(256) +
        CenterCrop(224) at 224 px; the same centre region for a 112 px tokenizer view), e.g. for validation losses."""
        tokenizer_view = None if tokenizer_image_processor is None else center_crop_view(tokenizer_image_processor)
        return cls(center_crop_view(image_processor), tokenizer_view, train=False)

    def __call__(self, image: Image.Image, rng: np.random.Generator | None = None) -> dict[str, torch.Tensor]:
        """The views of one image: `pixel_values` and, with a tokenizer processor, `tokenizer_pixel_values`.

        Args:
            image (`PIL.Image.Image`): The image, in any mode.
            rng (`numpy.random.Generator`, *optional*): Source of randomness; by default one seeded
                from torch's global RNG, so DataLoader workers and `set_seed` control it.
        """
        image = to_rgb(image)
        if not self.train:
            return {
                key: processor(image, return_tensors="pt")["pixel_values"][0] for key, processor in self.views.items()
            }
        rng = numpy_rng_from_torch() if rng is None else rng
        draws = self._draw(image.width, image.height, rng)
        render = self._render_exact if self.exact else self._render_fast
        outputs = render(image, draws, rng)
        if self.random_erasing is not None:
            outputs["pixel_values"] = self.random_erasing(outputs["pixel_values"], rng)
        return outputs


__all__ = ["CENTER_CROP_FRACTION", "TwoViewTransform", "center_crop_view", "random_resized_crop_box"]
