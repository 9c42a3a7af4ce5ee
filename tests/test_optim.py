import pytest
from conftest import tiny_beit_config
from transformers import BeitConfig, BeitForImageClassification

from hf_mim import BeitMimForMaskedImageModeling
from hf_mim.training.optim import beit_layer_id, build_param_groups


def groups_by_name(groups):
    return {name: group for group in groups for name in group["names"]}


def test_no_weight_decay_follows_beit():
    model = BeitMimForMaskedImageModeling(tiny_beit_config())
    groups = groups_by_name(build_param_groups(model, weight_decay=0.05, learning_rate=1e-3))
    decayed = {name for name, group in groups.items() if group["weight_decay"] > 0}
    assert "beit.embeddings.cls_token" not in decayed
    assert "beit.layers.0.lambda_1" not in decayed
    assert "beit.layers.0.attention.q_proj.bias" not in decayed
    assert "beit.layers.0.layernorm_before.weight" not in decayed
    # The reference decays the mask token and the shared relative position bias table in pre-training.
    assert "beit.embeddings.mask_token" in decayed
    assert "beit.shared_position_bias.relative_position_bias_table" in decayed
    assert "beit.layers.1.mlp.fc2.weight" in decayed and "lm_head.weight" in decayed
    # The frozen tokenizer is not optimised at all.
    assert not any(name.startswith("tokenizer.") for name in groups)
    assert all(group["lr"] == 1e-3 for group in groups.values())


def test_layer_wise_learning_rate_decay():
    config = BeitConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        image_size=32, patch_size=8, num_labels=3)
    model = BeitForImageClassification(config)
    groups = groups_by_name(build_param_groups(model, weight_decay=0.05, learning_rate=1.0, layer_decay=0.5))
    # L = 2: embeddings 0.5^3, layer i 0.5^(2 - i), head 1.
    assert groups["beit.embeddings.patch_embeddings.projection.weight"]["lr"] == pytest.approx(0.125)
    assert groups["beit.layers.0.mlp.fc1.weight"]["lr"] == pytest.approx(0.25)
    assert groups["beit.layers.1.mlp.fc1.weight"]["lr"] == pytest.approx(0.5)
    assert groups["classifier.weight"]["lr"] == pytest.approx(1.0)
    assert groups["beit.pooler.layernorm.weight"]["lr"] == pytest.approx(1.0)


def test_layer_id_and_bad_decay():
    assert beit_layer_id("beit.embeddings.cls_token", 12) == 0
    assert beit_layer_id("beit.layers.11.mlp.fc2.weight", 12) == 12
    assert beit_layer_id("lm_head.weight", 12) == 13
    model = BeitMimForMaskedImageModeling(tiny_beit_config())
    with pytest.raises(ValueError, match="layer_decay"):
        build_param_groups(model, 0.05, 1e-3, layer_decay=1.5)
