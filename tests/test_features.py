"""Frozen-feature extraction, its disk cache, and the probe / k-NN command lines."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, BeitConfig, BeitModel

from hf_mim import BeitMimForMaskedImageModeling
from hf_mim.evaluation import knn, probe
from hf_mim.evaluation.export import BEIT_POOLERS, beit_config_for_export
from hf_mim.evaluation.features import FEATURE_POOLINGS, extract_features, model_fingerprint, pool_tokens
from hf_mim.models import MimImageProcessor


@pytest.fixture(scope="module")
def model_and_processor(tiny_mim_dir):
    return BeitMimForMaskedImageModeling.from_pretrained(tiny_mim_dir).eval(), AutoImageProcessor.from_pretrained(tiny_mim_dir)


def images(count=5, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (24 + i, 40, 3), dtype=np.uint8)) for i in range(count)]


def test_features_are_pooled_hidden_states(model_and_processor):
    model, processor = model_and_processor
    data = images()
    result = extract_features(model, processor, data, labels=[0, 1, 0, 1, 2], layers=(0, -1), pooling="cls+mean", batch_size=2)
    assert sorted(result.features) == [0, 2] and result.labels.tolist() == [0, 1, 0, 1, 2]
    pixel_values = processor(data, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hidden_states = model.beit(pixel_values, output_hidden_states=True).hidden_states
    for layer in (0, 2):
        expected = torch.cat([hidden_states[layer][:, 0], hidden_states[layer][:, 1:].mean(1)], dim=1)
        assert result.features[layer].shape == (5, 64)
        torch.testing.assert_close(result.features[layer], expected, rtol=1e-5, atol=1e-5)


def test_final_norm_normalises_the_last_blocks_tokens_only(model_and_processor, tmp_path):
    model, processor = model_and_processor
    data = images()
    plain = extract_features(model, processor, data, layers=(1, -1), pooling="cls", cache_dir=str(tmp_path))
    normed = extract_features(model, processor, data, layers=(1, -1), pooling="cls", final_norm=True, cache_dir=str(tmp_path))
    pixel_values = processor(data, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        last = model.beit(pixel_values, output_hidden_states=True).hidden_states[-1]
        expected = model.layernorm(last)[:, 0]  # the MIM head's LayerNorm follows the last block
    torch.testing.assert_close(normed.features[2], expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(normed.features[2], plain.features[2], atol=1e-3)
    assert torch.equal(normed.features[1], plain.features[1])
    # The last layer's features with the norm are cached apart; layer 1's are the same entry.
    assert len(os.listdir(tmp_path)) == 3
    again = extract_features(model, processor, data, layers=(-1,), pooling="cls", final_norm=True, cache_dir=str(tmp_path))
    assert torch.equal(again.features[2], normed.features[2])
    with pytest.raises(ValueError, match=r"layers \[1\] leave out; add -1"):
        extract_features(model, processor, data, layers=(1,), final_norm=True)
    with pytest.raises(ValueError, match="no LayerNorm after its last block"):
        extract_features(model.beit, processor, data, final_norm=True)  # the encoder alone has none


def test_final_norm_of_an_encoder_that_holds_it_leaves_the_model_as_it_was():
    # A [CLS]-pooling encoder (e.g. exported with --pooling cls) holds its final LayerNorm: it moves, and is put
    # back, with the encoder (its state taken after the encoder moved sent it back to the extraction device).
    config = BeitConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, image_size=32,
                        patch_size=8, use_mean_pooling=False)  # fmt: skip
    encoder = BeitModel(config).train()
    processor = MimImageProcessor(size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32})
    result = extract_features(encoder, processor, images(2), final_norm=True, device="cpu")
    assert result.features[2].shape == (2, 16)
    assert all(module.training for module in encoder.modules())


def test_pooling_modes():
    tokens = torch.arange(2 * 3 * 4, dtype=torch.float).view(2, 3, 4)
    assert torch.equal(pool_tokens(tokens, "cls"), tokens[:, 0])
    assert torch.equal(pool_tokens(tokens, "mean"), tokens[:, 1:].mean(1))
    with pytest.raises(ValueError, match="pooling"):
        pool_tokens(tokens, "max")


def test_probe_poolings_and_the_exported_poolers_are_two_sets():
    # Probes pool frozen tokens three ways; an exported BeitModel's pooler does one of two (`use_mean_pooling`).
    tokens = torch.arange(2 * 3 * 4, dtype=torch.float).view(2, 3, 4)
    assert {pooling: pool_tokens(tokens, pooling).shape[-1] for pooling in FEATURE_POOLINGS} == {
        "cls": 4, "mean": 4, "cls+mean": 8
    }
    assert {pooler: beit_config_for_export(BeitConfig(), pooler).use_mean_pooling for pooler in BEIT_POOLERS} == {
        "mean": True, "cls": False
    }
    with pytest.raises(ValueError, match=r"pooling must be one of \('mean', 'cls'\), got 'cls\+mean'"):
        beit_config_for_export(BeitConfig(), "cls+mean")


def test_cache_is_reused_and_keyed(model_and_processor, tiny_mim_dir, tmp_path):
    model, processor = model_and_processor
    data, labels = images(), [0, 1, 0, 1, 0]
    first = extract_features(model, processor, data, labels, layers=(1,), cache_dir=str(tmp_path))
    assert len(os.listdir(tmp_path)) == 1
    # The same weights loaded as the AutoModel encoder have the same fingerprint: the cache answers, no forward pass.
    encoder = AutoModel.from_pretrained(tiny_mim_dir)
    assert model_fingerprint(encoder) == model_fingerprint(model.beit)
    encoder.forward = None
    cached = extract_features(encoder, processor, data, labels, layers=(1,), cache_dir=str(tmp_path))
    assert torch.equal(cached.features[1], first.features[1]) and torch.equal(cached.labels, first.labels)
    # Other pooling, labels or weights are other entries.
    extract_features(model, processor, data, labels, layers=(1,), pooling="cls", cache_dir=str(tmp_path))
    extract_features(model, processor, data, [1, 1, 0, 1, 0], layers=(1,), cache_dir=str(tmp_path))
    assert len(os.listdir(tmp_path)) == 3
    with torch.no_grad():
        model.beit.embeddings.cls_token.add_(1.0)
    try:
        changed = extract_features(model, processor, data, labels, layers=(1,), cache_dir=str(tmp_path))
    finally:
        with torch.no_grad():
            model.beit.embeddings.cls_token.sub_(1.0)
    assert len(os.listdir(tmp_path)) == 4 and not torch.equal(changed.features[1], first.features[1])


def test_undecodable_images_are_skipped_with_their_labels(model_and_processor):
    model, processor = model_and_processor
    data = images(3)
    result = extract_features(model, processor, [data[0], b"not an image", data[2]], labels=[4, 5, 6])
    assert result.labels.tolist() == [4, 6] and result.features[2].shape == (2, 32)


def test_bad_input(model_and_processor):
    model, processor = model_and_processor
    with pytest.raises(ValueError, match="layer 3 does not exist"):
        extract_features(model, processor, images(1), layers=(3,))
    with pytest.raises(ValueError, match="labels"):
        extract_features(model, processor, images(2), labels=[0])


def test_probe_and_knn_scripts(tiny_mim_dir, image_folder, tmp_path, capsys):
    common = [
        "--model_name_or_path", tiny_mim_dir, "--train_dir", image_folder, "--train_val_split", "0.25",
        "--layers", "1", "-1", "--pooling", "cls+mean", "--feature_cache_dir", str(tmp_path / "features"),
        "--output_dir", str(tmp_path), "--batch_size", "8",
    ]
    results = probe.main([*common, "--weight_decays", "1e-3", "1e-1", "--max_iter", "20"])
    assert set(results["layers"]) == {1, 2} and 0.0 <= results["accuracy"] <= 1.0
    assert results["num_train"] == 18 and results["num_eval"] == 6
    assert "linear probe top-1" in capsys.readouterr().out
    saved = json.loads((tmp_path / "linear_probe_results.json").read_text())
    assert saved["best_layer"] == results["best_layer"]
    # Both splits at both layers were cached by the probe; k-NN reads them back.
    assert len(os.listdir(tmp_path / "features")) == 4
    results = knn.main([*common, "--ks", "1", "5"])
    assert set(results["layers"][1]) == {1, 5} and results["reference_k"] == 5
    assert len(os.listdir(tmp_path / "features")) == 4
    assert (tmp_path / "knn_results.json").exists()
    assert (results["pooling"], results["final_norm"], results["view"]) == ("cls+mean", False, "center_crop")
    results = knn.main([*common, "--ks", "1", "--final_norm"])
    assert results["final_norm"] is True and "cls+mean pooling, final norm, center_crop view" in capsys.readouterr().out
    assert len(os.listdir(tmp_path / "features")) == 6  # the last layer's with the norm are cached apart
    # The same options as one JSON file, as the training commands take them (it was refused as a missing flag).
    options = {"model_name_or_path": tiny_mim_dir, "train_dir": image_folder, "train_val_split": 0.25, "layers": [1, -1],
               "pooling": "cls+mean", "feature_cache_dir": str(tmp_path / "features"), "output_dir": str(tmp_path),
               "batch_size": 8, "ks": [1, 5]}  # fmt: skip
    (tmp_path / "knn.json").write_text(json.dumps(options))
    assert knn.main([str(tmp_path / "knn.json")])["layers"] == knn.main([*common, "--ks", "1", "5"])["layers"]


@pytest.mark.parametrize("view", ["center_crop", "whole"])
def test_probe_and_knn_features_take_the_papers_evaluation_view(model_and_processor, image_folder, view):
    """BEiT's linear probe evaluates, and DINO's k-NN embeds, Resize(256) + CenterCrop(224) views: the commands' default.
    The images here are 40x48, so the view decides what the features see."""
    from hf_mim.data import center_crop_view, load_image_datasets_from_args
    from hf_mim.evaluation.features import FeatureArguments, load_features

    model, processor = model_and_processor
    args = FeatureArguments(
        model_name_or_path=model.name_or_path, train_dir=image_folder, train_val_split=0.25, layers=[-1], view=view
    )
    train, evaluation = load_features(args)
    raw, _ = load_image_datasets_from_args(args, args.seed)
    expected_processor = center_crop_view(processor) if view == "center_crop" else processor
    assert expected_processor.do_center_crop == (view == "center_crop")
    for split, features in (("train", train), ("validation", evaluation)):
        expected = extract_features(model, expected_processor, raw[split], layers=[-1])
        torch.testing.assert_close(features.features[2], expected.features[2])
    other = extract_features(model, processor if view == "center_crop" else center_crop_view(processor), raw["train"], layers=[-1])
    assert not torch.allclose(train.features[2], other.features[2], atol=1e-3)
