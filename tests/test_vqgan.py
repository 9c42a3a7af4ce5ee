"""The taming VQGAN encoder tokenizer: taming's layout, conversion of `last.ckpt`, safe loading, remote code."""

import pathlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_hf_mim_card, tiny_vqgan_config
from PIL import Image
from transformers import AutoImageProcessor, AutoModel

from hf_mim import VqganConfig, VqganImageProcessor, VqganModel
from hf_mim.convert.taming import convert_taming_checkpoint, load_taming_state_dict, vqgan_from_taming_state_dict


REPO = pathlib.Path(__file__).resolve().parents[1]
# vqgan_gumbel_f8's model.yaml (ddconfig ch 128, ch_mult [1,1,2,4], attn_resolutions [32] at resolution 256).
F8 = {"ch": 128, "ch_mult": (1, 1, 2, 4), "num_res_blocks": 2, "attn_levels": (3,), "z_channels": 256,
      "embed_dim": 256, "n_embed": 8192}
# The smallest layout taming's fixed 32-group GroupNorm allows; 16 px -> a 4x4 grid.
TINY = {"ch": 32, "ch_mult": (1, 1, 2), "num_res_blocks": 2, "attn_levels": (2,), "z_channels": 16, "embed_dim": 8,
        "n_embed": 64}


def taming_shapes(ch, ch_mult, num_res_blocks, attn_levels, z_channels, embed_dim, n_embed, in_channels=3):
    """Names and shapes of a taming GumbelVQ state dict, written from taming's module layout: the encoder path
    plus parts of the full model that a tokenizer leaves out (codebook, decoder, loss)."""
    shapes = {}

    def conv(name, cin, cout, kernel):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cout, cin, kernel, kernel), (cout,)

    def norm(name, channels):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (channels,), (channels,)

    def resnet(name, cin, cout):
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def attention(name, channels):
        norm(f"{name}.norm", channels)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{part}", channels, channels, 1)

    conv("encoder.conv_in", in_channels, ch, 3)
    cin = ch
    for level, multiplier in enumerate(ch_mult):
        cout = ch * multiplier
        for block in range(num_res_blocks):
            resnet(f"encoder.down.{level}.block.{block}", cin if block == 0 else cout, cout)
            if level in attn_levels:
                attention(f"encoder.down.{level}.attn.{block}", cout)
        if level != len(ch_mult) - 1:
            conv(f"encoder.down.{level}.downsample.conv", cout, cout, 3)
        cin = cout
    resnet("encoder.mid.block_1", cin, cin)
    attention("encoder.mid.attn_1", cin)
    resnet("encoder.mid.block_2", cin, cin)
    norm("encoder.norm_out", cin)
    conv("encoder.conv_out", cin, z_channels, 3)
    conv("quant_conv", z_channels, embed_dim, 1)
    conv("quantize.proj", embed_dim, n_embed, 1)
    shapes["quantize.embed.weight"] = (n_embed, embed_dim)
    conv("post_quant_conv", embed_dim, z_channels, 1)
    conv("decoder.conv_in", z_channels, ch * ch_mult[-1], 3)
    shapes["loss.discriminator.main.0.weight"] = (8, 3, 4, 4)
    return shapes


def random_taming_state_dict(seed=0, **layout):
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for name, shape in taming_shapes(**layout).items():
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        scale = 1.0 / fan_in**0.5 if len(shape) > 1 else 0.2
        state_dict[name] = torch.randn(shape, generator=generator) * scale
        if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name.endswith("norm.weight"):
            state_dict[name] += 1.0
    return state_dict


def taming_reference_logits(state_dict, pixels, ch_mult, num_res_blocks, attn_levels, groups):
    """taming's encoder -> quant_conv -> quantize.proj, as plain functional ops on the taming state dict."""

    def conv(h, name, stride=1, padding=None):
        weight = state_dict[f"{name}.weight"]
        padding = weight.shape[-1] // 2 if padding is None else padding
        return F.conv2d(h, weight, state_dict[f"{name}.bias"], stride=stride, padding=padding)

    def norm(h, name):
        return F.group_norm(h, groups, state_dict[f"{name}.weight"], state_dict[f"{name}.bias"], eps=1e-6)

    def swish(h):
        return h * torch.sigmoid(h)

    def resnet(h, name):
        residual = conv(swish(norm(h, f"{name}.norm1")), f"{name}.conv1")
        residual = conv(swish(norm(residual, f"{name}.norm2")), f"{name}.conv2")
        shortcut = conv(h, f"{name}.nin_shortcut") if f"{name}.nin_shortcut.weight" in state_dict else h
        return shortcut + residual

    def attention(h, name):
        batch, channels, height, width = h.shape
        normed = norm(h, f"{name}.norm")
        q, k, v = (conv(normed, f"{name}.{part}").reshape(batch, channels, -1) for part in "qkv")
        weights = torch.softmax(q.transpose(1, 2) @ k * channels**-0.5, dim=2)
        return h + conv((v @ weights.transpose(1, 2)).reshape(batch, channels, height, width), f"{name}.proj_out")

    h = conv(pixels, "encoder.conv_in")
    for level in range(len(ch_mult)):
        for block in range(num_res_blocks):
            h = resnet(h, f"encoder.down.{level}.block.{block}")
            if level in attn_levels:
                h = attention(h, f"encoder.down.{level}.attn.{block}")
        if level != len(ch_mult) - 1:
            h = conv(F.pad(h, (0, 1, 0, 1)), f"encoder.down.{level}.downsample.conv", stride=2, padding=0)
    h = resnet(attention(resnet(h, "encoder.mid.block_1"), "encoder.mid.attn_1"), "encoder.mid.block_2")
    h = conv(swish(norm(h, "encoder.norm_out")), "encoder.conv_out")
    return conv(conv(h, "quant_conv"), "quantize.proj").flatten(2).transpose(1, 2)


def lightning_checkpoint(state_dict):
    """What a PyTorch Lightning `last.ckpt` holds besides the weights (plain containers only)."""
    return {
        "epoch": 3,
        "global_step": 1200,
        "pytorch-lightning_version": "1.0.8",
        "state_dict": state_dict,
        "callbacks": {"ModelCheckpoint": {"best_model_score": torch.tensor(0.5), "best_model_path": "x.ckpt"}},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 4.5e-6, "params": [0, 1]}]}],
        "lr_schedulers": [],
    }


def test_f8_checkpoint_converts_with_no_missing_or_unexpected_keys_and_gives_14x14x8192_logits():
    # Full size on the meta device: names and shapes are checked without allocating ~30M weights.
    with torch.device("meta"):
        state_dict = {name: torch.empty(shape) for name, shape in taming_shapes(**F8).items()}
    model = vqgan_from_taming_state_dict(state_dict, device="meta")
    config = model.config
    assert (config.hidden_size, config.channel_multipliers, config.num_res_blocks) == (128, [1, 1, 2, 4], 2)
    assert (config.attention_levels, config.z_channels, config.embed_dim) == ([3], 256, 256)
    assert (config.codebook_size, config.image_size, config.grid_size) == (8192, 112, 14)
    # The defaults are this checkpoint; every encoder-path tensor has a home, nothing else is kept.
    assert config.to_diff_dict() == VqganConfig().to_diff_dict()
    kept = {name for name in state_dict if name.startswith(("encoder.", "quant_conv.", "quantize.proj."))}
    assert {name.replace("quantize.proj.", "codebook_projection.") for name in kept} == set(model.state_dict())
    # get_codebook_logits' float32 guard (autocast) has no meta backend; its modules are what decide the shape.
    logits = model.codebook_projection(model.quant_conv(model.encoder(torch.empty(2, 3, 112, 112, device="meta"))))
    assert logits.shape == (2, 8192, 14, 14)


def test_conversion_matches_taming_encoder_numerics(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    state_dict = random_taming_state_dict(**TINY)
    torch.save(lightning_checkpoint(state_dict), tmp_path / "last.ckpt")
    converted = convert_taming_checkpoint(tmp_path / "last.ckpt", output_dir=tmp_path / "vqgan", image_size=16)
    loaded = AutoModel.from_pretrained(tmp_path / "vqgan")
    assert type(loaded) is VqganModel and loaded.config.grid_size == 4
    assert_hf_mim_card(tmp_path / "vqgan")
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    expected = taming_reference_logits(state_dict, pixels, TINY["ch_mult"], 2, TINY["attn_levels"], groups=32)
    with torch.no_grad():
        logits = loaded.get_codebook_logits(pixels)
        assert torch.equal(logits, converted.get_codebook_logits(pixels))
    assert logits.shape == (2, 16, 64)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(loaded.get_codebook_indices(pixels), expected.argmax(-1))
    processor = AutoImageProcessor.from_pretrained(tmp_path / "vqgan")
    assert type(processor) is VqganImageProcessor and processor.size == {"height": 16, "width": 16}


def test_matches_the_taming_transformers_package():
    # taming-transformers (PyPI) requires torchvision and pytorch-lightning, so it is not a test dependency; where it
    # is importable, its own Encoder is the reference.
    taming = pytest.importorskip("taming.modules.diffusionmodules.model")
    torch.manual_seed(0)
    encoder = taming.Encoder(ch=32, out_ch=3, ch_mult=(1, 1, 2), num_res_blocks=2, attn_resolutions=[4], dropout=0.0,
                             in_channels=3, resolution=16, z_channels=16, double_z=False).eval()
    state_dict = random_taming_state_dict(**TINY)
    state_dict.update({f"encoder.{name}": tensor for name, tensor in encoder.state_dict().items()})
    model = vqgan_from_taming_state_dict(state_dict, image_size=16)
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        latents = F.conv2d(encoder(pixels), state_dict["quant_conv.weight"], state_dict["quant_conv.bias"])
        expected = F.conv2d(latents, state_dict["quantize.proj.weight"], state_dict["quantize.proj.bias"])
        torch.testing.assert_close(model.get_codebook_logits(pixels), expected.flatten(2).transpose(1, 2),
                                   rtol=1e-4, atol=1e-5)


def test_safe_loading_refuses_pickled_objects_without_running_them(tmp_path):
    calls = []
    state_dict = random_taming_state_dict(**TINY)
    checkpoint = lightning_checkpoint(state_dict)
    checkpoint["hyper_parameters"] = Payload(calls)
    torch.save(checkpoint, tmp_path / "last.ckpt")
    calls.clear()
    with pytest.raises(ValueError, match="weights_only=True"):
        load_taming_state_dict(tmp_path / "last.ckpt")
    assert calls == []


class Payload:
    """Unpickling this would call `record` (a stand-in for arbitrary code in a malicious checkpoint)."""

    def __init__(self, calls):
        self.calls = calls

    def __reduce__(self):
        return record, ("unpickled",)


def record(message):
    pytest.fail(f"a pickled callable ran while loading: {message}")


def test_plain_state_dicts_and_safetensors_load(tmp_path):
    from safetensors.torch import save_file

    state_dict = random_taming_state_dict(**TINY)
    torch.save(state_dict, tmp_path / "state_dict.pt")
    save_file(state_dict, tmp_path / "model.safetensors")
    for path in (tmp_path / "state_dict.pt", tmp_path / "model.safetensors"):
        loaded = load_taming_state_dict(path)
        assert loaded.keys() == state_dict.keys() and all(torch.equal(loaded[k], state_dict[k]) for k in state_dict)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda sd: sd.pop("quantize.proj.weight"), "not a taming GumbelVQ"),
        (lambda sd: sd.pop("encoder.down.1.block.1.conv2.bias"), "missing"),
        (lambda sd: sd.__setitem__("quant_conv.bias", torch.zeros(5)), "Shape mismatch for quant_conv.bias"),
    ],
)
def test_malformed_checkpoints_are_clear_errors(edit, message):
    state_dict = random_taming_state_dict(**TINY)
    edit(state_dict)
    with pytest.raises(ValueError, match=message):
        vqgan_from_taming_state_dict(state_dict, image_size=16)


def test_vector_quantizer_checkpoint_is_named():
    state_dict = random_taming_state_dict(**TINY)
    state_dict.pop("quantize.proj.weight")
    state_dict.pop("quantize.proj.bias")
    state_dict["quantize.embedding.weight"] = torch.zeros(64, 8)
    with pytest.raises(ValueError, match="VectorQuantizer"):
        vqgan_from_taming_state_dict(state_dict)


def test_script_converts(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_taming", REPO / "scripts" / "convert_taming_to_hf_mim.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    torch.save(lightning_checkpoint(random_taming_state_dict(**TINY)), tmp_path / "last.ckpt")
    script.main(["--checkpoint", str(tmp_path / "last.ckpt"), "--output_dir", str(tmp_path / "out"), "--image_size", "32"])
    assert AutoModel.from_pretrained(tmp_path / "out").config.grid_size == 8


# --- tokenizer protocol, processor, config ------------------------------------------------------------------------


def test_processor_is_the_112px_lanczos_view_in_minus_one_to_one():
    processor = VqganImageProcessor()
    assert processor.output_size == (112, 112) and int(processor.resample) == int(Image.Resampling.LANCZOS)
    black, white = Image.new("RGB", (200, 150)), Image.new("RGB", (200, 150), (255, 255, 255))
    assert processor(black, return_tensors="pt").pixel_values.shape == (1, 3, 112, 112)
    assert processor(black, return_tensors="pt").pixel_values.min().item() == pytest.approx(-1.0)
    assert processor(white, return_tensors="pt").pixel_values.max().item() == pytest.approx(1.0)


def test_protocol_shapes_wrong_view_and_no_decoder():
    model = VqganModel(tiny_vqgan_config()).eval()
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    logits = model.get_codebook_logits(pixels)
    assert logits.shape == (2, 16, 64) and logits.dtype == torch.float32
    assert torch.equal(model.get_codebook_indices(pixels), logits.argmax(-1))
    assert torch.equal(model(pixels).logits, logits)
    with pytest.raises(ValueError, match="16x16 inputs"):
        model.get_codebook_logits(torch.rand(2, 3, 32, 32))
    with pytest.raises(NotImplementedError, match="no pixel decoder"):
        model.decode(logits.argmax(-1))
    with pytest.raises(ValueError, match="float32"):
        model.half().get_codebook_logits(pixels)


def test_logits_stay_float32_under_autocast():
    model = VqganModel(tiny_vqgan_config()).eval()
    pixels = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model.get_codebook_logits(pixels)
    assert logits.dtype == torch.float32 and torch.equal(logits, model.get_codebook_logits(pixels))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image_size": 100}, "divisible by the encoder's downsampling factor 8"),
        ({"hidden_size": 48}, "norm_num_groups=32 must divide"),
        ({"attention_levels": [4]}, "attention_levels"),
        ({"channel_multipliers": []}, "channel_multipliers"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VqganConfig(**kwargs)


def test_tokenizer_checkpoint_loads_without_hf_mim(tmp_path):
    from test_remote_code import load_remotely

    tokenizer = VqganModel(tiny_vqgan_config()).eval()
    tokenizer.save_pretrained(tmp_path)
    VqganImageProcessor(size={"height": 16, "width": 16}).save_pretrained(tmp_path)
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    torch.save({"pixel_values": pixels}, tmp_path / "inputs.pt")

    result, remote = load_remotely(tmp_path, "tokenizer")

    assert result["encoder_class"] == "VqganModel" and result["processor_class"] == "VqganImageProcessor"
    assert not result["hf_mim_imported"]
    with torch.no_grad():
        # The other process may use more threads: same function, another float summation order.
        torch.testing.assert_close(tokenizer.get_codebook_logits(pixels), remote["logits"], rtol=1e-5, atol=1e-6)
