"""hf_mim.data.resampling: PIL's Lanczos resize as banded float32 matrix products."""

import numpy as np
import pytest
import torch
from PIL import Image

from hf_mim.data import random_resized_crop_box
from hf_mim.data.resampling import lanczos_resize


def photo() -> Image.Image:
    """A real photo (scikit-learn's bundled china.jpg): edges, textures, saturated sky."""
    from sklearn.datasets import load_sample_image

    return Image.fromarray(load_sample_image("china.jpg"))


def pil_lanczos(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    return torch.from_numpy(np.array(image.resize(size[::-1], Image.Resampling.LANCZOS))).permute(2, 0, 1).float()


def channels_first(image: Image.Image) -> torch.Tensor:
    # A PIL image's array seen channels first, in channels-last memory: what the training transform passes.
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


@pytest.mark.parametrize("size", [(112, 112), (224, 224), (112, 160), (300, 90)])
def test_lanczos_resize_is_pils_up_to_its_rounding_on_random_crops_of_a_photo(size):
    image, rng = photo(), np.random.default_rng(0)
    differences = []
    for scale in [(0.08, 1.0), (0.002, 0.01)]:  # downscaling, and upscaling of small crops
        for _ in range(6):
            top, left, height, width = random_resized_crop_box(image.width, image.height, scale, (3 / 4, 4 / 3), rng)
            crop = image.crop((left, top, left + width, top + height))
            got = lanczos_resize(channels_first(crop), size)
            assert got.shape == (3, *size) and got.dtype == torch.float32
            assert got.min() >= 0 and got.max() <= 255
            differences.append((got - pil_lanczos(crop, size)).abs().flatten())
    differences = torch.cat(differences)
    # PIL rounds each pass to 8 bits (about 0.25 level on average from the last alone).
    assert differences.max() <= 1.5 and differences.mean() < 0.35, (differences.max(), differences.mean())


def test_lanczos_resize_follows_pils_pass_order_and_leaves_a_kept_dimension_unfiltered():
    image = photo().crop((0, 0, 180, 400))
    # Height shrinks more than twice as much as the width: PIL filters columns first; the width is kept as it is.
    for size in [(100, 150), (100, 180)]:
        got = lanczos_resize(channels_first(image), size)
        assert (got - pil_lanczos(image, size)).abs().max() <= 1.5
    same = lanczos_resize(channels_first(image), (400, 180))
    assert torch.equal(same, channels_first(image).float())


def test_lanczos_resize_of_a_constant_image_is_that_constant_and_a_sharp_edge_is_clipped_as_pil():
    flat = torch.full((3, 97, 131), 77, dtype=torch.uint8)
    torch.testing.assert_close(lanczos_resize(flat, (40, 50)), torch.full((3, 40, 50), 77.0), atol=1e-3, rtol=0)
    # Lanczos rings at a black/white edge: both clip to [0, 255] rather than overshoot.
    edge = np.zeros((64, 64, 3), dtype=np.uint8)
    edge[:, 32:] = 255
    got = lanczos_resize(torch.from_numpy(edge).permute(2, 0, 1), (24, 24))
    expected = pil_lanczos(Image.fromarray(edge), (24, 24))
    assert got.min() == 0 and got.max() == 255
    assert (got - expected).abs().max() <= 1.0


def test_lanczos_resize_refuses_a_batch_or_an_empty_size():
    with pytest.raises(ValueError, match="channels, height, width"):
        lanczos_resize(torch.zeros(1, 3, 8, 8), (4, 4))
    with pytest.raises(ValueError, match="positive size"):
        lanczos_resize(torch.zeros(3, 8, 8), (0, 4))


def test_lanczos_resize_returns_a_new_tensor_even_when_no_pass_runs():
    # A float32 input of the output's size came back as the input itself, which the caller then edits in place.
    pixels = torch.rand(3, 8, 8) * 255
    out = lanczos_resize(pixels, (8, 8))
    assert out.data_ptr() != pixels.data_ptr() and torch.equal(out, pixels)
