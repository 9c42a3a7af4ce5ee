"""Export of an hf_mim encoder to a stock transformers BEiT checkpoint."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_CONFIGS
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForMaskedImageModeling, BeitConfig, BeitForImageClassification, BeitModel

from hf_mim import BeitMimForMaskedImageModeling, MimImageProcessor
from hf_mim.evaluation.export import (
    encoder_image_processor,
    export_to_transformers,
    geometric_offset_positions,
    image_processor_at_size,
    main,
    resize_relative_position_bias_table,
    resolve_encoder,
    to_transformers_beit,
)


@pytest.fixture(scope="module")
def mim_model(tiny_mim_dir):
    return BeitMimForMaskedImageModeling.from_pretrained(tiny_mim_dir).eval()


@pytest.fixture(scope="module")
def exported_dir(tiny_mim_dir, tmp_path_factory):
    return export_to_transformers(tiny_mim_dir, str(tmp_path_factory.mktemp("exported")))


def pixels(seed=0):
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_exported_folder_is_plain_transformers_beit(exported_dir):
    assert sorted(os.listdir(exported_dir)) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    config = json.loads(open(os.path.join(exported_dir, "config.json")).read())
    assert config["model_type"] == "beit" and config["architectures"] == ["BeitModel"]
    assert "auto_map" not in config and "tokenizer_config" not in config
    assert config["layer_norm_eps"] == 1e-6 and config["use_shared_relative_position_bias"]
    processor = json.loads(open(os.path.join(exported_dir, "preprocessor_config.json")).read())
    assert processor["image_processor_type"] == "BeitImageProcessor" and "auto_map" not in processor


def test_round_trip_gives_identical_hidden_states(mim_model, exported_dir):
    stock = BeitModel.from_pretrained(exported_dir).eval()
    assert type(stock) is BeitModel
    with torch.no_grad():
        expected = mim_model.beit(pixels(), output_hidden_states=True).hidden_states
        actual = stock(pixels(), output_hidden_states=True).hidden_states
    assert len(actual) == len(expected) == 3
    for a, b in zip(actual, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_exported_image_processor_preprocesses_identically(tiny_mim_dir, exported_dir):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    ours = AutoImageProcessor.from_pretrained(tiny_mim_dir)(image, return_tensors="pt")["pixel_values"]
    stock = AutoImageProcessor.from_pretrained(exported_dir)
    assert type(stock).__name__ == "BeitImageProcessorPil"
    torch.testing.assert_close(stock(image, return_tensors="pt")["pixel_values"], ours)


def test_classification_model_only_initialises_its_classifier(exported_dir):
    model, info = BeitForImageClassification.from_pretrained(exported_dir, num_labels=5, output_loading_info=True)
    assert info["missing_keys"] == {"classifier.weight", "classifier.bias"}
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    # The pooler LayerNorm (unilm's fc_norm) is written as the identity, as the reference initialises it.
    assert torch.all(model.beit.pooler.layernorm.weight == 1) and torch.all(model.beit.pooler.layernorm.bias == 0)


def test_per_layer_tables_are_copies_of_the_shared_one(mim_model):
    stock = to_transformers_beit(mim_model, per_layer_relative_position_bias=True)
    assert stock.shared_position_bias is None and stock.config.use_relative_position_bias
    shared = mim_model.beit.shared_position_bias.relative_position_bias_table
    assert shared.abs().sum() > 0
    for layer in stock.layers:
        assert torch.equal(layer.relative_position_bias.relative_position_bias_table, shared)
    with torch.no_grad():
        expected = mim_model.beit(pixels(1), output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(stock(pixels(1), output_hidden_states=True).hidden_states[-1], expected)


def test_cls_pooling_keeps_the_final_norm(mim_model):
    stock = to_transformers_beit(mim_model, pooling="cls")
    assert not stock.config.use_mean_pooling
    with torch.no_grad():
        output = stock(pixels())
        expected = mim_model.layernorm(mim_model.beit(pixels()).last_hidden_state)
    torch.testing.assert_close(output.last_hidden_state, expected)
    torch.testing.assert_close(output.pooler_output, expected[:, 0])


def test_stock_transformers_loads_it_without_hf_mim(exported_dir):
    code = f"""
import sys
import torch
from PIL import Image
from transformers import BeitBackbone, BeitForImageClassification, BeitModel, pipeline
path = {exported_dir!r}
BeitModel.from_pretrained(path)
_, info = BeitForImageClassification.from_pretrained(path, num_labels=3, output_loading_info=True)
assert info["missing_keys"] == {{"classifier.weight", "classifier.bias"}}, info
backbone, info = BeitBackbone.from_pretrained(path, out_indices=[1, 2], output_loading_info=True)
assert not info["missing_keys"], info
maps = backbone(torch.randn(1, 3, 32, 32)).feature_maps
assert [tuple(m.shape) for m in maps] == [(1, 32, 4, 4)] * 2
features = pipeline("image-feature-extraction", model=path)(Image.new("RGB", (40, 40), "red"))
assert len(features[0]) == 17 and len(features[0][0]) == 32
assert not any(name.split(".")[0] == "hf_mim" for name in sys.modules), "hf_mim was imported"
"""
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]


def test_script_exports_a_checkpoint_folder(tiny_mim_dir, tmp_path, capsys):
    main(["--model_name_or_path", tiny_mim_dir, "--output_dir", str(tmp_path), "--per_layer_relative_position_bias"])
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["use_relative_position_bias"] and not config["use_shared_relative_position_bias"]
    assert "model_type 'beit'" in capsys.readouterr().out


def test_exporting_a_fine_tuned_classifier_says_its_head_is_left_behind(tiny_mim_dir, tmp_path, capsys):
    from transformers import BeitForImageClassification

    from hf_mim.evaluation.export import to_transformers_beit

    encoder = to_transformers_beit(tiny_mim_dir, num_labels=2)
    classifier = BeitForImageClassification(encoder.config)
    classifier.save_pretrained(tmp_path / "classifier")
    shutil.copy(Path(tiny_mim_dir) / "preprocessor_config.json", tmp_path / "classifier")
    main(["--model_name_or_path", str(tmp_path / "classifier"), "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert "is an image classifier (BeitForImageClassification); only its encoder is exported" in err
    # An encoder's export says nothing of the kind.
    main(["--model_name_or_path", tiny_mim_dir, "--output_dir", str(tmp_path / "encoder")])
    assert "image classifier" not in capsys.readouterr().err


MIM_FAMILIES = sorted(name for name, factory in TINY_CONFIGS.items() if isinstance(factory(), BeitConfig))


@pytest.mark.parametrize("model_type", MIM_FAMILIES)
def test_every_mim_family_exports(model_type, tmp_path):
    config = TINY_CONFIGS[model_type]()
    model = AutoModelForMaskedImageModeling.from_config(config).eval()
    side = config.image_size
    # A raw [0, 1] view: families that normalise inside (CCViT) get their config's normalisation written out.
    processor = MimImageProcessor(size={"height": side, "width": side}, do_normalize=False)
    export_to_transformers(model, str(tmp_path), processor, per_layer_relative_position_bias=True)
    stock, info = BeitForImageClassification.from_pretrained(tmp_path, num_labels=2, output_loading_info=True)
    assert info["missing_keys"] == {"classifier.weight", "classifier.bias"} and not info["unexpected_keys"]
    with torch.no_grad():
        expected = model.beit(pixels(), output_hidden_states=True).hidden_states
        actual = stock.beit(pixels(), output_hidden_states=True).hidden_states
    for a, b in zip(actual, expected):
        torch.testing.assert_close(a, b)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    if hasattr(config, "image_mean"):
        assert saved["do_normalize"] and saved["image_mean"] == pytest.approx(list(config.image_mean))
    else:
        assert not saved["do_normalize"]


def test_processor_of_an_encoder_that_normalises_inside():
    config = TINY_CONFIGS["hf_mim_ccvit"]()
    completed = encoder_image_processor(MimImageProcessor(do_normalize=False), config)
    assert completed.do_normalize and completed.image_mean == pytest.approx(list(config.image_mean))
    with pytest.raises(ValueError, match="trained on inputs normalised with mean"):
        encoder_image_processor(MimImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3), config)
    plain = MimImageProcessor(do_normalize=False)
    assert encoder_image_processor(plain, BeitConfig()) is plain


def test_bad_input(mim_model, tmp_path):
    with pytest.raises(ValueError, match="image_processor"):
        export_to_transformers(mim_model, str(tmp_path))
    with pytest.raises(TypeError, match="BEiT encoder"):
        resolve_encoder(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="pooling"):
        to_transformers_beit(mim_model, pooling="max")


def test_geometric_offset_positions_follow_beit():
    # Window 14 -> 24 (224 -> 384 px at patch 16): offsets 0, +-1 stay, +-13 lands on +-23, gaps grow geometrically.
    positions = geometric_offset_positions(13, 23)
    assert positions.shape == (27,) and positions[13] == 0 and positions[14] == 1 and positions[12] == -1
    assert positions[-1] == pytest.approx(23, abs=1e-9) and positions[0] == pytest.approx(-23, abs=1e-9)
    gaps = np.diff(positions[13:])
    ratios = gaps[1:] / gaps[:-1]
    assert np.allclose(ratios, ratios[0]) and ratios[0] > 1
    np.testing.assert_allclose(geometric_offset_positions(13, 13), np.arange(-13, 14))
    np.testing.assert_allclose(geometric_offset_positions(4, 2), np.arange(-4, 5) / 2)  # shrinking: uniform


def test_relative_position_bias_table_resize_keeps_near_offsets_and_cls_entries():
    old, new = (4, 4), (7, 7)  # offsets -3..3 -> -6..6 on each axis
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(7 * 7 + 3, 2, generator=generator)
    resized = resize_relative_position_bias_table(table, old, new)
    assert resized.shape == (13 * 13 + 3, 2)
    torch.testing.assert_close(resized[-3:], table[-3:])
    before, after = table[:-3].reshape(7, 7, 2), resized[:-3].reshape(13, 13, 2)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):  # the neighbourhood that matters most keeps its learnt biases
            torch.testing.assert_close(after[6 + dy, 6 + dx], before[3 + dy, 3 + dx])
    torch.testing.assert_close(after[0, 12], before[0, 6], atol=1e-6, rtol=0)
    torch.testing.assert_close(after[12, 0], before[6, 0], atol=1e-6, rtol=0)
    torch.testing.assert_close(resize_relative_position_bias_table(table, old, old), table)
    # Down to one patch a side, only offset 0 is left, with its learnt bias (a division by zero before).
    torch.testing.assert_close(resize_relative_position_bias_table(table, old, (1, 1))[0], before[3, 3])
    torch.testing.assert_close(resize_relative_position_bias_table(table, old, (1, 4))[:-3], before[3])
    with pytest.raises(ValueError, match="has 52 rows"):
        resize_relative_position_bias_table(table[:-1], (4, 4), (7, 7))


def test_relative_position_bias_table_resize_is_cubic():
    # A table that is a cubic polynomial of the learnt offsets' positions comes back as that polynomial at the new
    # offsets: exact for a cubic spline, off by up to several units for linear interpolation between positions.
    old, new = (5, 5), (9, 9)
    positions = geometric_offset_positions(4, 8)
    row, column = np.meshgrid(positions, positions, indexing="ij")
    cubic = lambda y, x: 0.01 * y**3 - 0.2 * y * x**2 + 0.5 * x - 1.0  # noqa: E731
    table = torch.cat([torch.from_numpy(cubic(row, column)).reshape(-1, 1), torch.zeros(3, 1)]).repeat(1, 2)
    resized = resize_relative_position_bias_table(table, old, new)[:-3].reshape(17, 17, 2)
    offsets = np.arange(-8, 9, dtype=np.float64)
    expected = torch.from_numpy(cubic(*np.meshgrid(offsets, offsets, indexing="ij")))
    torch.testing.assert_close(resized[..., 0], expected, atol=1e-9, rtol=0)
    torch.testing.assert_close(resized[..., 1], expected, atol=1e-9, rtol=0)


def _unilm_offset_positions(source_size: int, target_size: int) -> np.ndarray:
    """Where BEiT's fine-tuning code puts the learnt offsets, as the spec describes it: q by bisection in
    [1.01, 1.5] to a tolerance of 1e-6, offsets at 0, +-1, +-(1 + q), ..."""
    left, right, half = 1.01, 1.5, source_size // 2
    while right - left > 1e-6:
        q = (left + right) / 2
        if (1 - q**half) / (1 - q) > target_size // 2:
            right = q
        else:
            left = q
    distances, current = [], 1.0
    for i in range(half):
        distances.append(current)
        current += q ** (i + 1)
    return np.array([-d for d in reversed(distances)] + [0.0] + distances)


def _spline_resized_table(table: torch.Tensor, positions: np.ndarray, target_size: int) -> torch.Tensor:
    """A cubic interpolating spline per head, as scipy's `interp2d(kind="cubic")` in BEiT's code computes it on a
    grid (FITPACK's `RectBivariateSpline(kx=3, ky=3, s=0)`)."""
    interpolate = pytest.importorskip("scipy.interpolate")
    targets = np.arange(-(target_size // 2), target_size // 2 + 0.1, 1.0)
    heads = []
    for head in range(table.shape[1]):
        grid = table[:-3, head].reshape(len(positions), len(positions)).double().numpy()
        spline = interpolate.RectBivariateSpline(positions, positions, grid, kx=3, ky=3, s=0)
        heads.append(torch.from_numpy(spline(targets, targets)).reshape(-1, 1))
    return torch.cat([torch.cat(heads, dim=1).to(table.dtype), table[-3:]])


@pytest.mark.parametrize("new_side", [24, 32])  # 224 -> 384 and 512 px at patch 16
def test_relative_position_bias_table_resize_matches_beit_finetuning(new_side):
    positions = geometric_offset_positions(13, new_side - 1)
    unilm_positions = _unilm_offset_positions(27, 2 * new_side - 1)
    np.testing.assert_allclose(positions, unilm_positions, rtol=1e-5)  # unilm stops its bisection at 1e-6
    table = torch.randn(27 * 27 + 3, 3, generator=torch.Generator().manual_seed(1))
    resized = resize_relative_position_bias_table(table, (14, 14), (new_side, new_side))
    torch.testing.assert_close(resized, _spline_resized_table(table, positions, 2 * new_side - 1), atol=1e-6, rtol=0)
    torch.testing.assert_close(resized, _spline_resized_table(table, unilm_positions, 2 * new_side - 1), atol=2e-3, rtol=0)


def test_export_at_a_larger_image_size(tiny_mim_dir, mim_model, tmp_path):
    side = mim_model.config.image_size * 2
    export_to_transformers(tiny_mim_dir, str(tmp_path), per_layer_relative_position_bias=True, image_size=side)
    stock, info = BeitForImageClassification.from_pretrained(tmp_path, num_labels=2, output_loading_info=True)
    assert stock.config.image_size == side
    assert info["missing_keys"] == {"classifier.weight", "classifier.bias"} and not info["unexpected_keys"]
    grid = side // mim_model.config.patch_size
    table = stock.beit.layers[0].relative_position_bias.relative_position_bias_table
    assert table.shape[0] == (2 * grid - 1) ** 2 + 3
    shared = mim_model.beit.shared_position_bias.relative_position_bias_table
    torch.testing.assert_close(table[-3:], shared[-3:])
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    assert processor(image, return_tensors="pt")["pixel_values"].shape[-2:] == (side, side)
    with torch.no_grad():
        assert stock(pixel_values=torch.randn(1, 3, side, side)).logits.shape == (1, 2)


def test_image_processor_at_size_keeps_the_crop_fraction():
    processor = MimImageProcessor(size={"height": 256, "width": 256}, crop_size={"height": 224, "width": 224}, do_center_crop=True)
    resized = image_processor_at_size(processor, 448)
    assert resized.output_size == (448, 448) and resized.size == {"height": 512, "width": 512}
    assert image_processor_at_size(MimImageProcessor(size={"height": 32, "width": 32}), 64).output_size == (64, 64)


def test_export_refuses_a_new_patch_size(mim_model):
    with pytest.raises(ValueError, match="patch size"):
        to_transformers_beit(mim_model, patch_size=mim_model.config.patch_size * 2)


def test_export_refuses_sizes_the_patches_do_not_tile(mim_model):
    patch = mim_model.config.patch_size
    for size in (patch * 4 + patch // 2, 0):
        with pytest.raises(ValueError, match="positive multiple of the patch size"):
            to_transformers_beit(mim_model, image_size=size)


def test_export_refuses_to_resize_absolute_position_embeddings():
    config = BeitConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, use_absolute_position_embeddings=True)  # fmt: skip
    with pytest.raises(ValueError, match="absolute position embeddings"):
        to_transformers_beit(BeitModel(config), image_size=64)
    assert to_transformers_beit(BeitModel(config)).config.image_size == 32


def test_image_processor_at_size_needs_square_images():
    with pytest.raises(ValueError, match="square"):
        image_processor_at_size(MimImageProcessor(size={"height": 32, "width": 48}), 64)
