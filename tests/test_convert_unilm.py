"""Conversion of unilm BEiT / BEiT v2 / VQ-KD checkpoints, checked against a plain-torch reimplementation of the
reference forward passes (fused qkv with q/v biases, gamma layer scale, unilm's relative position index) that runs
on the source tensors."""

import argparse
import itertools

import pytest
import torch
from conftest import assert_hf_mim_card
import torch.nn.functional as F
from transformers import AutoImageProcessor, AutoModel, AutoModelForMaskedImageModeling

from hf_mim import (
    BeitMimConfig,
    BeitMimForMaskedImageModeling,
    Beitv2Config,
    Beitv2ForMaskedImageModeling,
    VqkdConfig,
    VqkdImageProcessor,
    VqkdModel,
)
from hf_mim.convert.unilm import (
    convert_beit_checkpoint,
    convert_beit_state_dict,
    convert_vqkd_checkpoint,
    convert_vqkd_state_dict,
    load_unilm_state_dict,
)
from hf_mim.models import modeling_vqkd

# ---------------------------------------------------------------- synthetic checkpoints in the reference layout


def _randn(*shape, scale=0.1, make=torch.randn):
    return make(*shape) * scale if make is torch.randn else make(*shape)


def vit_state(prefix, hidden, depth, mlp, in_channels, patch, grid, *, make=torch.randn, pos=True, rel_heads=None,
              gamma=False, fc_norm=False, mask_token=False, blocks="blocks"):
    """unilm `VisionTransformer` keys (spec §4.2-4.4) with random values."""
    r = lambda *shape, scale=0.1: _randn(*shape, scale=scale, make=make)
    state = {
        f"{prefix}cls_token": r(1, 1, hidden, scale=0.5),
        f"{prefix}patch_embed.proj.weight": r(hidden, in_channels, patch, patch, scale=0.2),
        f"{prefix}patch_embed.proj.bias": r(hidden),
    }
    if pos:
        state[f"{prefix}pos_embed"] = r(1, grid * grid + 1, hidden, scale=0.5)
    if mask_token:
        state[f"{prefix}mask_token"] = r(1, 1, hidden, scale=0.5)
    if rel_heads:
        state[f"{prefix}rel_pos_bias.relative_position_bias_table"] = r((2 * grid - 1) ** 2 + 3, rel_heads, scale=1.0)
        state[f"{prefix}rel_pos_bias.relative_position_index"] = torch.zeros(grid * grid + 1, grid * grid + 1).long()
    for i in range(depth):
        state.update(block_state(f"{prefix}{blocks}.{i}.", hidden, mlp, gamma, make))
    if fc_norm:
        state[f"{prefix}fc_norm.weight"] = 1 + r(hidden)
        state[f"{prefix}fc_norm.bias"] = r(hidden)
    return state


def block_state(prefix, hidden, mlp, gamma, make=torch.randn):
    r = lambda *shape, scale=0.1: _randn(*shape, scale=scale, make=make)
    state = {
        f"{prefix}norm1.weight": 1 + r(hidden), f"{prefix}norm1.bias": r(hidden),
        f"{prefix}attn.qkv.weight": r(3 * hidden, hidden, scale=0.3),
        f"{prefix}attn.q_bias": r(hidden), f"{prefix}attn.v_bias": r(hidden),
        f"{prefix}attn.proj.weight": r(hidden, hidden, scale=0.3), f"{prefix}attn.proj.bias": r(hidden),
        f"{prefix}norm2.weight": 1 + r(hidden), f"{prefix}norm2.bias": r(hidden),
        f"{prefix}mlp.fc1.weight": r(mlp, hidden, scale=0.3), f"{prefix}mlp.fc1.bias": r(mlp),
        f"{prefix}mlp.fc2.weight": r(hidden, mlp, scale=0.3), f"{prefix}mlp.fc2.bias": r(hidden),
    }
    if gamma:
        state[f"{prefix}gamma_1"] = 0.5 + r(hidden)
        state[f"{prefix}gamma_2"] = 0.5 + r(hidden)
    return state


def vqkd_state(hidden=32, depth=2, decoder_depth=1, mlp=64, patch=8, grid=4, codes=16, code_dim=8, teacher_dim=16,
               make=torch.randn):
    """A VQ-KD checkpoint (spec §4.4), including the keys the reference loader drops (teacher, scaling, loss)."""
    r = lambda *shape, scale=0.1: _randn(*shape, scale=scale, make=make)
    state = vit_state("encoder.", hidden, depth, mlp, 3, patch, grid, make=make, fc_norm=True)
    state.update(vit_state("decoder.", hidden, decoder_depth, mlp, code_dim, 1, grid, make=make, fc_norm=True))
    state.update({
        "encode_task_layer.0.weight": r(hidden, hidden, scale=0.3), "encode_task_layer.0.bias": r(hidden),
        "encode_task_layer.2.weight": r(code_dim, hidden, scale=0.3), "encode_task_layer.2.bias": r(code_dim),
        "decode_task_layer.0.weight": r(hidden, hidden, scale=0.3), "decode_task_layer.0.bias": r(hidden),
        "decode_task_layer.2.weight": r(teacher_dim, hidden, scale=0.3), "decode_task_layer.2.bias": r(teacher_dim),
        "quantize.embedding.weight": F.normalize(torch.randn(codes, code_dim), dim=-1),
        "quantize.embedding.cluster_size": torch.rand(codes), "quantize.embedding.embed_avg": torch.randn(codes, code_dim),
        "quantize.embedding.initted": torch.ones(1), "quantize.cluster_size": torch.rand(codes) * 10,
        "teacher_model.visual.proj": torch.randn(4, 4), "scaling_layer.shift": torch.zeros(1, 3, 1, 1),
        "scaling_layer.scale": torch.ones(1, 3, 1, 1),
    })
    return state


def beit_state(hidden=32, depth=3, heads=2, mlp=64, patch=8, grid=4, vocab=64, head_layers=0, make=torch.randn):
    """A BEiT (v1, spec §4.2) or, with `head_layers`, BEiT v2 (§4.3) pre-training checkpoint."""
    state = vit_state("", hidden, depth, mlp, 3, patch, grid, make=make, pos=False, rel_heads=heads, gamma=True,
                      mask_token=True)
    for j in range(head_layers):
        state.update(block_state(f"cls_pt_layers.{j}.", hidden, mlp, gamma=True, make=make))
    r = lambda *shape, scale=0.1: _randn(*shape, scale=scale, make=make)
    state.update({"norm.weight": 1 + r(hidden), "norm.bias": r(hidden), "lm_head.weight": r(vocab, hidden, scale=0.3),
                  "lm_head.bias": r(vocab)})
    return state


# ---------------------------------------------------------------- the reference forward passes, on source tensors


def ref_block(x, sd, p, heads, bias=None):
    batch, tokens, dim = x.shape
    head_dim = dim // heads
    h = F.layer_norm(x, (dim,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
    qkv_bias = torch.cat([sd[p + "attn.q_bias"], torch.zeros(dim), sd[p + "attn.v_bias"]])
    qkv = F.linear(h, sd[p + "attn.qkv.weight"], qkv_bias).reshape(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    attn = (qkv[0] * head_dim**-0.5) @ qkv[1].transpose(-2, -1)
    if bias is not None:
        attn = attn + bias
    out = (attn.softmax(dim=-1) @ qkv[2]).transpose(1, 2).reshape(batch, tokens, dim)
    x = x + sd.get(p + "gamma_1", 1.0) * F.linear(out, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
    h = F.layer_norm(x, (dim,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
    h = F.linear(F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])), sd[p + "mlp.fc2.weight"],
                 sd[p + "mlp.fc2.bias"])
    return x + sd.get(p + "gamma_2", 1.0) * h


def ref_relative_position_bias(table, grid):
    """unilm's index: (dy + W - 1) * (2W - 1) + (dx + W - 1) for patches; [CLS] row, column and corner last."""
    coords = list(itertools.product(range(grid), range(grid)))
    offsets = (2 * grid - 1) ** 2
    index = torch.zeros(grid * grid + 1, grid * grid + 1, dtype=torch.long)
    for a, (ya, xa) in enumerate(coords):
        for b, (yb, xb) in enumerate(coords):
            index[a + 1, b + 1] = (ya - yb + grid - 1) * (2 * grid - 1) + (xa - xb + grid - 1)
    index[0, :] = offsets
    index[:, 0] = offsets + 1
    index[0, 0] = offsets + 2
    return table[index].permute(2, 0, 1)


def ref_vit(sd, prefix, images, patch, heads, depth):
    x = F.conv2d(images, sd[prefix + "patch_embed.proj.weight"], sd[prefix + "patch_embed.proj.bias"], stride=patch)
    x = torch.cat([sd[prefix + "cls_token"].expand(len(images), -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
    x = x + sd[prefix + "pos_embed"]
    for i in range(depth):
        x = ref_block(x, sd, f"{prefix}blocks.{i}.", heads)
    dim = x.shape[-1]
    return F.layer_norm(x[:, 1:], (dim,), sd[prefix + "fc_norm.weight"], sd[prefix + "fc_norm.bias"], eps=1e-6)


def ref_task_layer(sd, name, x):
    return F.linear(torch.tanh(F.linear(x, sd[f"{name}.0.weight"], sd[f"{name}.0.bias"])), sd[f"{name}.2.weight"],
                    sd[f"{name}.2.bias"])


def ref_vqkd(sd, pixels, heads=2, depth=2, decoder_depth=1, patch=8, grid=4):
    """Tokens by the reference's squared-distance argmin, and the decoded teacher-feature predictions."""
    z = ref_task_layer(sd, "encode_task_layer", ref_vit(sd, "encoder.", pixels * 2 - 1, patch, heads, depth))
    z = F.normalize(z, dim=-1).reshape(-1, z.shape[-1])
    codebook = sd["quantize.embedding.weight"]
    distances = z.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * z @ codebook.T
    tokens = distances.argmin(dim=1).view(len(pixels), -1)
    code_map = codebook[tokens].transpose(1, 2).reshape(len(pixels), -1, grid, grid)
    decoded = ref_task_layer(sd, "decode_task_layer", ref_vit(sd, "decoder.", code_map, 1, heads, decoder_depth))
    return tokens, decoded


def ref_beit_logits(sd, pixels, mask, heads=2, depth=3, patch=8, grid=4, early_layers=None):
    x = F.conv2d(pixels, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch).flatten(2)
    x = x.transpose(1, 2)
    m = mask.unsqueeze(-1).float()
    x = x * (1 - m) + sd["mask_token"] * m
    x = torch.cat([sd["cls_token"].expand(len(pixels), -1, -1), x], dim=1)
    bias = ref_relative_position_bias(sd["rel_pos_bias.relative_position_bias_table"], grid)
    for i in range(depth):
        x = ref_block(x, sd, f"blocks.{i}.", heads, bias)
        if i + 1 == early_layers:
            early = x[:, 1:]
    dim = x.shape[-1]
    head = lambda h: F.linear(F.layer_norm(h, (dim,), sd["norm.weight"], sd["norm.bias"], eps=1e-6),
                              sd["lm_head.weight"], sd["lm_head.bias"])[:, 1:][mask]
    if early_layers is None:
        return head(x), None
    s = torch.cat([x[:, :1], early], dim=1)
    for j in range(2):
        s = ref_block(s, sd, f"cls_pt_layers.{j}.", heads, bias)
    return head(x), head(s)


# ---------------------------------------------------------------- tests


@pytest.fixture
def pixels():
    return torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_vqkd_tokens_and_features_match_the_reference(tmp_path, pixels):
    torch.manual_seed(0)
    state = vqkd_state()
    torch.save({"model": state, "args": argparse.Namespace(lr=2e-4, model="vqkd_encoder_base")}, tmp_path / "vqkd.pth")
    model = convert_vqkd_checkpoint(tmp_path / "vqkd.pth", tmp_path / "out", num_attention_heads=2,
                                    decoder_attention_heads=2)
    assert (model.config.codebook_size, model.config.codebook_dim, model.config.teacher_dim) == (16, 8, 16)
    assert_hf_mim_card(tmp_path / "out")
    assert (model.config.decoder_layers, model.config.grid_size, model.config.image_size) == (1, 4, 32)
    with torch.no_grad():
        tokens, decoded = ref_vqkd(state, pixels)
        assert tokens.unique().numel() > 3  # a meaningful comparison, not a constant code
        assert torch.equal(model.get_codebook_indices(pixels), tokens)
        assert torch.allclose(model(pixels).predicted_features, decoded, atol=1e-4)

    reloaded = AutoModel.from_pretrained(tmp_path / "out")
    assert type(reloaded) is VqkdModel and reloaded.codebook.initted.item() == 1
    assert torch.equal(reloaded.codebook.weight, state["quantize.embedding.weight"])
    assert torch.equal(reloaded.codebook.cluster_size, state["quantize.cluster_size"])
    assert type(AutoImageProcessor.from_pretrained(tmp_path / "out")) is VqkdImageProcessor
    with torch.no_grad():
        assert torch.equal(reloaded.get_codebook_indices(pixels), tokens)


def test_converted_codebook_is_never_overwritten_by_kmeans(tmp_path, pixels, monkeypatch):
    torch.manual_seed(0)
    torch.save({"model": vqkd_state()}, tmp_path / "vqkd.pth")
    convert_vqkd_checkpoint(tmp_path / "vqkd.pth", tmp_path / "out", num_attention_heads=2, decoder_attention_heads=2)
    model = VqkdModel.from_pretrained(tmp_path / "out").train()
    monkeypatch.setattr(modeling_vqkd, "spherical_kmeans", lambda *args: pytest.fail("k-means overwrote the codebook"))
    before = model.codebook.weight.clone()
    model(pixels)
    # Training continues from the converted codes with one EMA step (decay 0.99), not from a fresh k-means.
    assert (model.codebook.weight - before).abs().max() < 0.05


def test_vqkd_checkpoints_without_a_trained_codebook_are_refused():
    state = vqkd_state()
    state["quantize.embedding.initted"] = torch.zeros(1)
    with pytest.raises(ValueError, match="not initialised"):
        convert_vqkd_state_dict(state, 2, 2)
    state = vqkd_state()
    state["quantize.embedding.weight"] = torch.zeros(16, 8)
    with pytest.raises(ValueError, match="not unit vectors"):
        convert_vqkd_state_dict(state, 2, 2)
    state = vqkd_state()
    with pytest.raises(ValueError, match="cannot be read from its weights.*--num_attention_heads"):
        convert_vqkd_state_dict(state)
    state["encoder.blocks.0.attn.relative_position_bias_table"] = torch.zeros(52, 2)
    with pytest.raises(ValueError, match="does not understand.*relative_position_bias_table"):
        convert_vqkd_state_dict(state, 2, 2)


def test_released_vqkd_layout_at_full_size_is_the_default_config_trained_without_restarts():
    state = vqkd_state(hidden=768, depth=12, decoder_depth=3, mlp=3072, patch=16, grid=14, codes=8192, code_dim=32,
                       teacher_dim=512, make=torch.empty)
    config, weights = convert_vqkd_state_dict(state)
    # hf_mim restarts dead codes by default; the released tokenizers' recipe has no restarts.
    defaults = VqkdConfig(dead_code_restart_steps=0)
    assert {k: v for k, v in config.to_dict().items() if k != "transformers_version"} == {
        k: v for k, v in defaults.to_dict().items() if k != "transformers_version"
    }
    with torch.device("meta"):
        expected = VqkdModel(config).state_dict()
    assert {k: tuple(v.shape) for k, v in weights.items()} == {k: tuple(v.shape) for k, v in expected.items()}


def test_beitv2_logits_of_both_branches_match_the_reference(tmp_path, pixels):
    torch.manual_seed(0)
    state = beit_state(head_layers=2)
    torch.save({"model": state}, tmp_path / "beitv2.pth")
    model = convert_beit_checkpoint(tmp_path / "beitv2.pth", tmp_path / "out", early_layers=2)
    assert type(model) is Beitv2ForMaskedImageModeling and model.tokenizer is None
    assert_hf_mim_card(tmp_path / "out")
    assert (model.config.early_layers, model.config.head_layers, model.config.num_attention_heads) == (2, 2, 2)
    mask = torch.rand(3, 16, generator=torch.Generator().manual_seed(1)) < 0.4
    labels = torch.randint(0, 64, (3, 16))
    with torch.no_grad():
        main, aggregation = ref_beit_logits(state, pixels, mask, early_layers=2)
        output = model(pixels, bool_masked_pos=mask, labels=labels)
    assert torch.allclose(output.logits, main, atol=1e-4)
    assert torch.allclose(output.aggregation_logits, aggregation, atol=1e-4)
    reloaded = AutoModelForMaskedImageModeling.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(reloaded(pixels, bool_masked_pos=mask, labels=labels).logits, output.logits)
    processor = AutoImageProcessor.from_pretrained(tmp_path / "out")
    assert tuple(processor.image_mean) == pytest.approx((0.485, 0.456, 0.406))


def test_beit_v1_logits_match_the_reference(tmp_path, pixels):
    torch.manual_seed(0)
    state = beit_state()
    torch.save({"model": state}, tmp_path / "beit.pth")
    model = convert_beit_checkpoint(tmp_path / "beit.pth", tmp_path / "out")
    assert type(model) is BeitMimForMaskedImageModeling and model.config.model_type == "hf_mim_beit"
    mask = torch.rand(3, 16, generator=torch.Generator().manual_seed(1)) < 0.4
    with torch.no_grad():
        main, _ = ref_beit_logits(state, pixels, mask)
        assert torch.allclose(model(pixels, bool_masked_pos=mask).logits, main, atol=1e-4)
    assert tuple(AutoImageProcessor.from_pretrained(tmp_path / "out").image_mean) == (0.5, 0.5, 0.5)


def test_beitv2_with_a_converted_tokenizer_computes_its_own_targets(tmp_path, pixels):
    torch.manual_seed(0)
    torch.save({"model": vqkd_state(codes=64)}, tmp_path / "vqkd.pth")
    convert_vqkd_checkpoint(tmp_path / "vqkd.pth", tmp_path / "vqkd", num_attention_heads=2, decoder_attention_heads=2)
    torch.save({"model": beit_state(head_layers=2)}, tmp_path / "beitv2.pth")
    model = convert_beit_checkpoint(tmp_path / "beitv2.pth", tmp_path / "out", tokenizer_name_or_path=str(tmp_path / "vqkd"))
    mask = torch.rand(3, 16) < 0.4
    mask[:, 0] = True
    with torch.no_grad():
        output = model(torch.randn(3, 3, 32, 32), bool_masked_pos=mask, tokenizer_pixel_values=pixels)
        tokens, _ = ref_vqkd(load_unilm_state_dict(tmp_path / "vqkd.pth"), pixels)
    assert torch.equal(output.labels, tokens[mask])
    assert (tmp_path / "out" / "tokenizer" / "preprocessor_config.json").exists()


def test_released_beitv2_layout_at_full_size_matches_the_default_model():
    config, weights = convert_beit_state_dict(beit_state(768, 12, 12, 3072, 16, 14, 8192, head_layers=2,
                                                         make=torch.empty))
    assert isinstance(config, Beitv2Config) and (config.early_layers, config.layer_scale_init_value) == (9, 0.1)
    with torch.device("meta"):
        expected = Beitv2ForMaskedImageModeling(Beitv2Config()).state_dict()
    assert {k: tuple(v.shape) for k, v in weights.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    assert sum(v.numel() for v in weights.values()) == 106_143_056
    assert isinstance(convert_beit_state_dict(beit_state())[0], BeitMimConfig)


def test_loading_refuses_pickled_code_with_a_clear_error(tmp_path):
    torch.save({"model": {"a": torch.zeros(1)}, "hook": argparse.ArgumentParser}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match=r"weights_only=True\) refused it.*weights_only=False"):
        load_unilm_state_dict(tmp_path / "evil.pth")
    torch.save({"model": {"a": torch.zeros(1)}, "args": argparse.Namespace(epochs=3)}, tmp_path / "ok.pth")
    assert list(load_unilm_state_dict(tmp_path / "ok.pth")) == ["a"]
