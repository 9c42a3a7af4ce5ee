"""The DALL-E dVAE tokenizer: shapes, parameter count, processor, safe conversion of OpenAI pickles, training."""

import functools
import json
import math
import os
import pickle
import subprocess
import sys
import textwrap
import types
from collections import OrderedDict

import numpy as np
import pytest
import torch
from conftest import assert_hf_mim_card
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import AutoModel

from hf_mim import DvaeConfig, DvaeImageProcessor, DvaeModel
from hf_mim.convert.dalle import ForbiddenGlobalError, convert_dalle_checkpoint
from hf_mim.training import train_tokenizer
from hf_mim.training.dvae import DvaeTrainer, gumbel_temperature

TINY = {"image_size": 32, "hidden_size": 16, "codebook_size": 64, "num_groups": 2, "decoder_hidden_size": 16}
# test_balancing_keeps_a_collapsing_setting_in_use: the balancing rate and steps.
BALANCE_RATE, BALANCE_STEPS = 0.05, 80


def mapped_pixels(batch_size: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return 0.8 * torch.rand(batch_size, 3, size, size, generator=generator) + 0.1


# --- architecture and tokenizer protocol -----------------------------------------------------------------------


def test_grid_of_the_dalle_layout():
    # 4 groups downsample 112 px by 8: BEiT's 14x14 grid.
    config = DvaeConfig(hidden_size=16, codebook_size=64, decoder_hidden_size=16)
    model = DvaeModel(config).eval()
    assert config.grid_size == 14
    logits = model.get_codebook_logits(mapped_pixels(2, 112))
    assert logits.shape == (2, 196, 64) and logits.dtype == torch.float32
    indices = model.get_codebook_indices(mapped_pixels(2, 112))
    assert indices.shape == (2, 196) and indices.dtype == torch.long


def test_tiny_logits_indices_and_decode():
    model = DvaeModel(DvaeConfig(**TINY)).eval()
    pixels = mapped_pixels(3, 32)
    logits = model.get_codebook_logits(pixels)
    assert logits.shape == (3, 256, 64)
    indices = model.get_codebook_indices(pixels)
    assert torch.equal(indices, logits.argmax(-1))
    # Row-major over the grid, the ViT patch order.
    grid_logits = model.encoder(pixels)
    assert torch.equal(indices.view(3, 16, 16), grid_logits.argmax(1))
    images = model.decode(indices)
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert torch.equal(model.decode(indices.view(3, 16, 16)), images)
    # Eval-mode forward reconstructs through the argmax tokens: the same images as decode().
    output = model(pixels)
    assert torch.allclose(output.reconstruction, images, atol=1e-6)
    assert torch.allclose(output.logits, logits)
    assert torch.equal(output.indices, indices)


def test_tokens_are_fp32_under_autocast():
    model = DvaeModel(DvaeConfig(**TINY)).eval()
    pixels = mapped_pixels(2, 32)
    reference = model.get_codebook_logits(pixels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model.get_codebook_logits(pixels)
    assert logits.dtype == torch.float32 and torch.equal(logits, reference)
    with pytest.raises(ValueError, match=r"call `.float\(\)`"):
        model.to(torch.bfloat16).get_codebook_logits(pixels)


def test_wrong_view_size_is_refused():
    model = DvaeModel(DvaeConfig(**TINY))
    with pytest.raises(ValueError, match="expects 32x32 inputs"):
        model.get_codebook_logits(mapped_pixels(1, 64))
    with pytest.raises(ValueError, match="decodes 16x16=256 codes"):
        model.decode(torch.zeros(1, 10, dtype=torch.long))


def test_without_decoder_the_model_holds_the_encoder_only_and_refuses_to_decode(tmp_path):
    full = DvaeModel(DvaeConfig(**TINY)).eval()
    model = DvaeModel(DvaeConfig(**TINY, with_decoder=False)).eval()
    assert model.decoder is None and not any(name.startswith("decoder.") for name in model.state_dict())
    assert set(model.state_dict()) == {name for name in full.state_dict() if name.startswith("encoder.")}
    model.load_state_dict({name: value for name, value in full.state_dict().items() if name.startswith("encoder.")})
    pixels = mapped_pixels(2, 32)
    assert torch.equal(model.get_codebook_logits(pixels), full.get_codebook_logits(pixels))
    indices = model.get_codebook_indices(pixels)
    with pytest.raises(ValueError, match=r"built without its decoder.*cannot decode.*standalone tokenizer checkpoint"):
        model.decode(indices)
    with pytest.raises(ValueError, match="built without its decoder.*cannot reconstruct"):
        model(pixels)
    # The switch round-trips through config.json, and the saved weights leave the decoder out.
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["with_decoder"] is False
    reloaded = AutoModel.from_pretrained(tmp_path)
    assert reloaded.decoder is None and torch.equal(reloaded.get_codebook_indices(pixels), indices)
    assert DvaeModel.from_pretrained(tmp_path, dtype=torch.bfloat16).encoder.output_conv.weight.dtype == torch.float32


def test_trainer_refuses_a_model_without_decoder(tmp_path):
    from transformers import TrainingArguments

    from hf_mim.data import MimDataCollator

    args = TrainingArguments(str(tmp_path), max_steps=1, use_cpu=True, report_to=[], save_strategy="no")
    with pytest.raises(ValueError, match="built without its decoder.*cannot be trained"):
        DvaeTrainer(
            model=DvaeModel(DvaeConfig(**TINY, with_decoder=False)), args=args, train_dataset=[],
            data_collator=MimDataCollator(),
        )  # fmt: skip


def test_base_parameter_counts_match_the_released_model():
    with torch.device("meta"):
        model = DvaeModel(DvaeConfig())
    assert sum(p.numel() for p in model.encoder.parameters()) == 53_786_240
    assert sum(p.numel() for p in model.decoder.parameters()) == 43_829_766


def test_training_forward_losses_and_gradients():
    model = DvaeModel(DvaeConfig(**TINY)).train()
    pixels = mapped_pixels(2, 32)
    output = model(pixels, temperature=0.5, kl_weight=0.1)
    assert output.reconstruction.shape == (2, 3, 32, 32)
    assert 0 <= output.kl_loss <= math.log(64) + 1e-5
    assert torch.allclose(output.loss, output.reconstruction_loss + 0.1 * output.kl_loss)
    # The tokens are the posterior's argmax also while the decoder sees Gumbel samples.
    assert torch.equal(output.indices, output.logits.argmax(-1))
    output.loss.backward()
    assert model.encoder.input_conv.weight.grad.abs().sum() > 0
    assert model(pixels, return_loss=False).loss is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image_size": 100}, "not divisible by the encoder's downsampling factor 8"),
        ({"hidden_size": 18}, "must be divisible by 4"),
        ({"codebook_size": 0}, "codebook_size must be a positive integer"),
        ({"logit_laplace_eps": 0.5}, r"logit_laplace_eps must lie in \[0, 0.5\)"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DvaeConfig(**kwargs)


def test_save_load_round_trip_keeps_fp32_and_auto_map(tmp_path):
    model = DvaeModel(DvaeConfig(**TINY)).eval()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "hf_mim_dvae"
    assert saved["auto_map"] == {"AutoConfig": "configuration_dvae.DvaeConfig", "AutoModel": "modeling_dvae.DvaeModel"}
    assert (tmp_path / "modeling_dvae.py").exists() and (tmp_path / "modeling_tokenizer.py").exists()
    pixels = mapped_pixels(2, 32)
    reloaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(reloaded, DvaeModel)
    assert torch.equal(reloaded.get_codebook_logits(pixels), model.get_codebook_logits(pixels))
    half = DvaeModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert half.encoder.output_conv.weight.dtype == torch.float32


# --- image processor --------------------------------------------------------------------------------------------


def test_processor_is_the_logit_laplace_map_and_round_trips(tmp_path):
    processor = DvaeImageProcessor()
    assert processor.output_size == (112, 112)
    assert int(processor.resample) == int(Image.Resampling.LANCZOS)
    black, white = Image.new("RGB", (150, 130), (0, 0, 0)), Image.new("RGB", (150, 130), (255, 255, 255))
    pixels = processor([black, white], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (2, 3, 112, 112)
    assert torch.allclose(pixels[0], torch.full_like(pixels[0], 0.1))
    assert torch.allclose(pixels[1], torch.full_like(pixels[1], 0.9))
    values = torch.rand(3, 8, 8)
    assert torch.allclose(processor.normalize_tensor(values), 0.8 * values + 0.1, atol=1e-6)

    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "DvaeImageProcessor"
    reloaded = DvaeImageProcessor.from_pretrained(tmp_path)
    assert reloaded.to_dict() == processor.to_dict()
    assert torch.equal(reloaded([black, white], return_tensors="pt")["pixel_values"], pixels)


def test_processor_for_a_config_follows_its_size_and_logit_laplace_eps():
    processor = DvaeImageProcessor.for_config(DvaeConfig(image_size=64, logit_laplace_eps=0.05))
    assert processor.output_size == (64, 64)
    values = torch.rand(3, 4, 4)
    assert torch.allclose(processor.normalize_tensor(values), 0.9 * values + 0.05, atol=1e-6)


# --- conversion of OpenAI's pickles ------------------------------------------------------------------------------


def _fake_dall_e_modules():
    """`dall_e.utils` / `dall_e.encoder` / `dall_e.decoder` with the released classes' module layout and attributes
    (the real ones are `attrs` classes; the pickle only stores instance dicts, so plain classes pickle alike)."""

    class Conv2d(nn.Module):
        def __init__(self, n_in, n_out, kw, use_float16=True):
            super().__init__()
            self.n_in, self.n_out, self.kw, self.use_float16 = n_in, n_out, kw, use_float16
            self.device, self.requires_grad = torch.device("cpu"), False
            self.w = nn.Parameter(torch.randn(n_out, n_in, kw, kw) / math.sqrt(n_in * kw * kw))
            self.b = nn.Parameter(0.1 * torch.randn(n_out))

        def forward(self, x):
            return F.conv2d(x, self.w, self.b, padding=(self.kw - 1) // 2)

    def make_block(name, kernels):
        class Block(nn.Module):
            def __init__(self, n_in, n_out, n_layers):
                super().__init__()
                self.n_in, self.n_out, self.n_layers = n_in, n_out, n_layers
                self.n_hid, self.post_gain = n_out // 4, 1 / n_layers**2
                self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
                widths = (n_in, self.n_hid, self.n_hid, self.n_hid, n_out)
                layers = []
                for i, kernel in enumerate(kernels):
                    layers += [
                        (f"relu_{i + 1}", nn.ReLU()),
                        (f"conv_{i + 1}", Conv2d(widths[i], widths[i + 1], kernel)),
                    ]
                self.res_path = nn.Sequential(OrderedDict(layers))

            def forward(self, x):
                return self.id_path(x) + self.post_gain * self.res_path(x)

        Block.__name__ = Block.__qualname__ = name
        return Block

    EncoderBlock = make_block("EncoderBlock", (3, 3, 3, 1))
    DecoderBlock = make_block("DecoderBlock", (1, 3, 3, 3))

    class Encoder(nn.Module):
        group_count = 4

        def __init__(self, n_hid, n_blk_per_group, vocab_size, input_channels=3):
            super().__init__()
            self.n_hid, self.n_blk_per_group, self.vocab_size = n_hid, n_blk_per_group, vocab_size
            self.input_channels, self.use_mixed_precision = input_channels, True
            n_layers = self.group_count * n_blk_per_group
            modules = [("input", Conv2d(input_channels, n_hid, 7))]
            in_width = n_hid
            for g in range(self.group_count):
                width = n_hid * 2**g
                group = [
                    (f"block_{i + 1}", EncoderBlock(in_width if i == 0 else width, width, n_layers))
                    for i in range(n_blk_per_group)
                ]
                if g < self.group_count - 1:
                    group.append(("pool", nn.MaxPool2d(kernel_size=2)))
                modules.append((f"group_{g + 1}", nn.Sequential(OrderedDict(group))))
                in_width = width
            output = nn.Sequential(
                OrderedDict([("relu", nn.ReLU()), ("conv", Conv2d(in_width, vocab_size, 1, False))])
            )
            self.blocks = nn.Sequential(OrderedDict([*modules, ("output", output)]))

        def forward(self, x):
            return self.blocks(x)

    class Decoder(nn.Module):
        group_count = 4

        def __init__(self, n_init, n_hid, n_blk_per_group, vocab_size, output_channels=3):
            super().__init__()
            n_layers = self.group_count * n_blk_per_group
            modules = [("input", Conv2d(vocab_size, n_init, 1, False))]
            in_width = n_init
            for g in range(self.group_count):
                width = n_hid * 2 ** (self.group_count - 1 - g)
                group = [
                    (f"block_{i + 1}", DecoderBlock(in_width if i == 0 else width, width, n_layers))
                    for i in range(n_blk_per_group)
                ]
                if g < self.group_count - 1:
                    group.append(("upsample", nn.Upsample(scale_factor=2, mode="nearest")))
                modules.append((f"group_{g + 1}", nn.Sequential(OrderedDict(group))))
                in_width = width
            output = nn.Sequential(
                OrderedDict([("relu", nn.ReLU()), ("conv", Conv2d(in_width, 2 * output_channels, 1))])
            )
            self.blocks = nn.Sequential(OrderedDict([*modules, ("output", output)]))

        def forward(self, x):
            return self.blocks(x)

    modules = {name: types.ModuleType(name) for name in ("dall_e", "dall_e.utils", "dall_e.encoder", "dall_e.decoder")}
    for module_name, classes in (
        ("dall_e.utils", (Conv2d,)),
        ("dall_e.encoder", (Encoder, EncoderBlock)),
        ("dall_e.decoder", (Decoder, DecoderBlock)),
    ):
        for cls in classes:
            cls.__module__, cls.__qualname__ = module_name, cls.__name__
            setattr(modules[module_name], cls.__name__, cls)
    return modules, Encoder, Decoder


@pytest.mark.filterwarnings("ignore:Couldn't retrieve source code")
@pytest.mark.parametrize("zipfile_format", [True, False], ids=["zip", "legacy"])
def test_convert_pickled_dall_e_modules_without_dall_e(tmp_path, zipfile_format):
    modules, Encoder, Decoder = _fake_dall_e_modules()
    sys.modules.update(modules)
    try:
        torch.manual_seed(0)
        encoder = Encoder(n_hid=16, n_blk_per_group=1, vocab_size=64).eval()
        decoder = Decoder(n_init=8, n_hid=16, n_blk_per_group=1, vocab_size=64).eval()
        for name, module in (("encoder", encoder), ("decoder", decoder)):
            torch.save(module, tmp_path / f"{name}.pkl", _use_new_zipfile_serialization=zipfile_format)
        pixels = mapped_pixels(2, 32)
        with torch.no_grad():
            reference_logits = encoder(pixels)
            one_hot = F.one_hot(reference_logits.argmax(1), 64).permute(0, 3, 1, 2).float()
            reference_images = ((torch.sigmoid(decoder(one_hot)[:, :3]) - 0.1) / 0.8).clamp(0, 1)
    finally:
        for name in modules:
            del sys.modules[name]

    output_dir = tmp_path / "converted"
    model = convert_dalle_checkpoint(tmp_path / "encoder.pkl", tmp_path / "decoder.pkl", output_dir, image_size=32)
    assert "dall_e" not in sys.modules
    assert_hf_mim_card(output_dir)
    config = model.config
    assert (config.hidden_size, config.num_groups, config.num_blocks_per_group) == (16, 4, 1)
    assert (config.codebook_size, config.decoder_hidden_size, config.grid_size) == (64, 8, 4)
    logits = model.get_codebook_logits(pixels)
    assert torch.allclose(logits, reference_logits.flatten(2).transpose(1, 2), atol=1e-5)
    assert torch.allclose(model.decode(logits.argmax(-1)), reference_images, atol=1e-5)

    reloaded = DvaeModel.from_pretrained(output_dir)
    assert torch.equal(reloaded.get_codebook_logits(pixels), logits)
    assert DvaeImageProcessor.from_pretrained(output_dir).output_size == (32, 32)

    # Without decoder.pkl there is no decoder: none is made up, and decoding says why it cannot.
    encoder_only = convert_dalle_checkpoint(tmp_path / "encoder.pkl", output_dir=tmp_path / "encoder_only", image_size=32)
    assert not encoder_only.config.with_decoder
    assert not any(key.startswith("decoder.") for key in encoder_only.state_dict())
    assert torch.equal(encoder_only.get_codebook_logits(pixels), logits)
    with pytest.raises(ValueError, match="built without its decoder"):
        encoder_only.decode(logits.argmax(-1))


@pytest.mark.filterwarnings("ignore:Couldn't retrieve source code")
def test_converted_processor_is_the_logit_laplace_map_of_the_converted_config(tmp_path, monkeypatch):
    """The DALL-E converter saves the view of the config it converts to, eps included (it saved the default 0.1 map
    whatever the config's logit_laplace_eps)."""
    import hf_mim.convert.dalle as dalle

    modules, Encoder, _ = _fake_dall_e_modules()
    sys.modules.update(modules)
    try:
        torch.save(Encoder(n_hid=16, n_blk_per_group=1, vocab_size=64).eval(), tmp_path / "encoder.pkl")
    finally:
        for name in modules:
            del sys.modules[name]
    monkeypatch.setattr(dalle, "DvaeConfig", functools.partial(DvaeConfig, logit_laplace_eps=0.05))
    model = convert_dalle_checkpoint(tmp_path / "encoder.pkl", output_dir=tmp_path / "out", image_size=32)
    assert model.config.logit_laplace_eps == 0.05
    values = torch.rand(3, 4, 4)
    processor = DvaeImageProcessor.from_pretrained(tmp_path / "out")
    assert torch.allclose(processor.normalize_tensor(values), 0.9 * values + 0.05, atol=1e-6)


class _RunsShellCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _RunsPython:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


@pytest.mark.parametrize("payload", [_RunsShellCommand, _RunsPython])
def test_malicious_pickle_is_refused_before_running(tmp_path, payload):
    marker = tmp_path / "marker"
    path = tmp_path / "encoder.pkl"
    torch.save({"blocks.input.w": torch.zeros(1), "evil": payload(marker)}, path)
    with pytest.raises(
        ForbiddenGlobalError, match=r"Refusing to unpickle the global '(posix\.system|builtins\.exec)'"
    ):
        convert_dalle_checkpoint(path, output_dir=tmp_path / "out")
    assert isinstance(ForbiddenGlobalError("x"), pickle.UnpicklingError)
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_other_pickled_modules_are_refused(tmp_path):
    torch.save(nn.Linear(2, 2), tmp_path / "linear.pkl")
    with pytest.raises(ForbiddenGlobalError, match="torch.nn.modules.linear.Linear"):
        convert_dalle_checkpoint(tmp_path / "linear.pkl")


# --- training -----------------------------------------------------------------------------------------------------


def _sample_photo_crops(count: int, size: int, seed: int = 0) -> list[Image.Image]:
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    photos = sklearn_datasets.load_sample_images().images
    rng = np.random.default_rng(seed)
    crops = []
    for index in range(count):
        photo = photos[index % len(photos)]
        side = int(rng.integers(64, 200))
        top, left = int(rng.integers(0, photo.shape[0] - side)), int(rng.integers(0, photo.shape[1] - side))
        crops.append(Image.fromarray(photo[top : top + side, left : left + side]).resize((size, size), Image.LANCZOS))
    return crops


def test_training_lowers_reconstruction_error_and_uses_many_codes(tmp_path):
    from transformers import TrainingArguments

    from hf_mim.data import MimDataCollator

    torch.manual_seed(0)
    config = DvaeConfig(image_size=32, hidden_size=16, codebook_size=64, num_groups=3, decoder_hidden_size=16)
    processor = DvaeImageProcessor.for_config(config)
    pixels = processor(_sample_photo_crops(48, 32), return_tensors="pt")["pixel_values"]
    model = DvaeModel(config)

    def argmax_reconstruction():
        model.eval()
        with torch.no_grad():
            error = model(pixels).reconstruction_loss.item()
            codes = model.get_codebook_indices(pixels).unique().numel()
        return error, codes

    error_before, _ = argmax_reconstruction()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=300,
        per_device_train_batch_size=16,
        learning_rate=1e-2,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        logging_steps=50,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = DvaeTrainer(
        model=model,
        args=args,
        train_dataset=[{"pixel_values": p} for p in pixels],
        data_collator=MimDataCollator(),
        kl_weight=1e-3,
    )
    trainer.train()
    error_after, codes_used = argmax_reconstruction()

    print(f"argmax reconstruction MSE {error_before:.4f} -> {error_after:.4f}, {codes_used} codes used")
    assert error_after < 0.3 * error_before, (error_before, error_after)
    assert codes_used >= 12, codes_used
    logs = [entry for entry in trainer.state.log_history if "codebook_usage" in entry]
    assert len(logs) == 6
    assert logs[-1]["temperature"] == pytest.approx(1 / 16)
    assert logs[0]["temperature"] > logs[-1]["temperature"]
    assert logs[-1]["kl_weight"] == pytest.approx(1e-3)
    assert 1 <= logs[-1]["codebook_perplexity"] <= logs[-1]["codebook_usage"] * 64 + 1e-9 and logs[-1]["codebook_usage"] <= 1
    assert logs[-1]["reconstruction_loss"] < logs[0]["reconstruction_loss"]


def test_temperature_schedules():
    assert gumbel_temperature(0.0) == pytest.approx(1.0)
    assert gumbel_temperature(1.0) == pytest.approx(1 / 16)
    assert gumbel_temperature(0.5, schedule="exponential") == pytest.approx(0.25)
    assert gumbel_temperature(2.0, schedule="exponential") == pytest.approx(1 / 16)
    with pytest.raises(ValueError, match="Unknown temperature schedule"):
        gumbel_temperature(0.5, schedule="linear")


def test_train_tokenizer_main_saves_a_reloadable_tokenizer(tmp_path, image_folder, monkeypatch):
    from hf_mim.training import dvae

    build_dvae_trainer, trainers = dvae.build_dvae_trainer, []

    def build_and_keep(*args, **kwargs):
        trainers.append(build_dvae_trainer(*args, **kwargs))
        return trainers[-1]

    monkeypatch.setattr(dvae, "build_dvae_trainer", build_and_keep)
    output_dir = tmp_path / "dvae"
    common = [
        "--train_dir", image_folder, "--do_train", "--max_steps", "3", "--per_device_train_batch_size", "4",
        "--learning_rate", "1e-3", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
        "--use_cpu", "--dataloader_num_workers", "0", "--disable_tqdm", "true",
    ]  # fmt: skip
    overrides = "image_size=32,hidden_size=16,codebook_size=64,num_groups=2,decoder_hidden_size=16"
    metrics = train_tokenizer.main(
        ["--tokenizer_type", "dvae", "--config_overrides", overrides, "--output_dir", str(output_dir), *common]
    )
    assert metrics["train_skipped_images"] == 0

    trained = trainers[-1].model.eval()
    reloaded = DvaeModel.from_pretrained(output_dir)
    assert reloaded.config.image_size == 32 and reloaded.config.codebook_size == 64
    pixels = mapped_pixels(2, 32)
    assert torch.equal(reloaded.get_codebook_logits(pixels), trained.get_codebook_logits(pixels))
    processor = DvaeImageProcessor.from_pretrained(output_dir)
    assert processor.output_size == (32, 32)
    for name in ("model.safetensors", "modeling_dvae.py", "configuration_dvae.py", "image_processing_dvae.py"):
        assert (output_dir / name).exists(), name
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    assert all("codebook_usage" in entry for entry in history if "loss" in entry)

    # Continue training from the saved tokenizer.
    continued = tmp_path / "continued"
    train_tokenizer.main(["--tokenizer_name_or_path", str(output_dir), "--output_dir", str(continued), *common])
    fields = ("image_size", "hidden_size", "codebook_size", "num_groups", "decoder_hidden_size")
    continued_config = DvaeModel.from_pretrained(continued).config
    assert all(getattr(continued_config, name) == getattr(reloaded.config, name) for name in fields)


def test_train_tokenizer_rejects_an_invalid_override(tmp_path, image_folder):
    with pytest.raises(ValueError, match="not divisible by the encoder's downsampling factor"):
        train_tokenizer.main(
            ["--config_overrides", "image_size=30", "--train_dir", image_folder, "--output_dir", str(tmp_path), "--do_train"]
        )


def test_schedules_follow_a_wall_clock_budget(tmp_path):
    import time

    from transformers import TrainingArguments

    from hf_mim.data import MimDataCollator
    from hf_mim.training.budget import TimeBudgetCallback

    config = DvaeConfig(image_size=32, hidden_size=16, codebook_size=64, num_groups=2, decoder_hidden_size=16)
    args = TrainingArguments(str(tmp_path), max_steps=100_000, use_cpu=True, report_to=[], save_strategy="no")
    trainer = DvaeTrainer(
        model=DvaeModel(config), args=args, train_dataset=[], data_collator=MimDataCollator(), kl_weight=1e-3,
        kl_warmup_fraction=0.1, anneal_fraction=1.0,
    )  # fmt: skip
    trainer.state.max_steps, trainer.state.global_step = 100_000, 50
    assert trainer.current_temperature() == pytest.approx(gumbel_temperature(50 / 100_000))
    # A budgeted run never reaches max_steps: its schedules run over the budget instead.
    budget = TimeBudgetCallback(max_train_seconds=100.0)
    trainer.add_callback(budget)
    budget.start = time.monotonic() - 50.0
    assert trainer.current_temperature() == pytest.approx(gumbel_temperature(0.5), rel=1e-3)
    assert trainer.current_kl_weight() == pytest.approx(1e-3)
    budget.start = time.monotonic() - 500.0
    assert trainer.current_temperature() == pytest.approx(1 / 16)


# --- keeping the codebook in use ----------------------------------------------------------------------------------


def test_balance_codes_moves_biases_towards_an_even_load():
    from hf_mim.training.dvae import balance_codes

    bias = torch.zeros(4)
    balance_codes(bias, torch.tensor([0, 10, 2, 4]), rate=0.5)  # mean load 4
    assert bias.tolist() == [0.5, -0.5, 0.5, 0.0]


def test_trainer_balances_with_the_step_counts_of_every_micro_batch(tmp_path):
    from transformers import TrainingArguments

    from hf_mim.data import MimDataCollator

    torch.manual_seed(0)
    model = DvaeModel(DvaeConfig(**TINY))
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=0.0, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    pixels = mapped_pixels(8, 32)
    trainer = DvaeTrainer(
        model=model, args=args, train_dataset=[{"pixel_values": p} for p in pixels], data_collator=MimDataCollator(),
        code_balance_rate=0.25,
    )  # fmt: skip
    bias = model.encoder.output_conv.bias
    expected = bias.detach().clone()
    loads = []
    original = trainer.balance_codes

    def balance_and_check():
        loads.append(trainer._step_counts.sum().item())
        with torch.no_grad():
            counts = torch.bincount(model.encoder(pixels[len(loads) * 4 - 4 : len(loads) * 4]).argmax(dim=1).flatten(), minlength=64)
        expected.add_(torch.sign(counts.float().mean() - counts.float()), alpha=0.25)
        original()

    trainer.balance_codes = balance_and_check
    trainer.train()
    # Two optimiser steps of two micro-batches of 2 images x 256 positions; with learning rate 0 only the
    # balancing moves the bias, by the counts of the step's four images.
    assert loads == [4 * 256, 4 * 256]
    torch.testing.assert_close(bias.detach(), expected)


def _codes_used_after_training(tmp_path, *, learning_rate: float, kl_weight: float, **trainer_kwargs) -> int:
    """Codes used on the 48 photo crops (256 codes, 8x8 grid) by a dVAE trained on them for BALANCE_STEPS."""
    from transformers import TrainingArguments

    from hf_mim.data import MimDataCollator

    config = DvaeConfig(image_size=32, hidden_size=16, codebook_size=256, num_groups=3, decoder_hidden_size=16)
    pixels = DvaeImageProcessor.for_config(config)(_sample_photo_crops(48, 32), return_tensors="pt")["pixel_values"]
    torch.manual_seed(0)
    model = DvaeModel(config)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=BALANCE_STEPS, per_device_train_batch_size=16,
        learning_rate=learning_rate, lr_scheduler_type="cosine", warmup_steps=0.05, save_strategy="no", report_to=[],
        use_cpu=True, disable_tqdm=True, seed=0,
    )  # fmt: skip
    DvaeTrainer(
        model=model, args=args, train_dataset=[{"pixel_values": p} for p in pixels], data_collator=MimDataCollator(),
        kl_weight=kl_weight, **trainer_kwargs,
    ).train()  # fmt: skip
    with torch.no_grad():
        return model.eval().get_codebook_indices(pixels).unique().numel()


def test_balancing_keeps_a_collapsing_setting_in_use(tmp_path):
    # At learning rate 1e-2 (the setting of test_training_lowers_reconstruction_error_and_uses_many_codes, with 256
    # codes on an 8x8 grid) DALL-E's recipe ends on 1 code; balancing keeps a quarter in use (67, measured).
    used = {
        rate: _codes_used_after_training(tmp_path / str(rate), learning_rate=1e-2, kl_weight=1e-3, code_balance_rate=rate)
        for rate in (0.0, BALANCE_RATE)
    }
    print(f"codes used of 256 on the 48 training crops: {used}")
    assert used[0.0] < 0.05 * 256 and used[BALANCE_RATE] >= 0.2 * 256, used


def test_the_temperature_reaches_its_end_value_half_way_by_default(tmp_path):
    # Issue 19: annealing until the last step ended balanced runs at the low point of their codebook usage (329-368
    # of 512 codes on test vs 495 at 0.5, benchmarks/README.md). Tiny data does not show it (172 vs 173 of 256 codes
    # on the 48 photo crops after 200 steps), so the default itself is what is checked here.
    from transformers import TrainingArguments

    from hf_mim.data import MimDataCollator
    from hf_mim.training.tokenizer_training import TokenizerArguments

    assert TokenizerArguments().gumbel_anneal_fraction == 0.5
    args = TrainingArguments(str(tmp_path), max_steps=100, use_cpu=True, report_to=[], save_strategy="no")
    trainer = DvaeTrainer(model=DvaeModel(DvaeConfig(**TINY)), args=args, data_collator=MimDataCollator())
    trainer.state.max_steps = 100
    temperatures = []
    for step in (25, 50, 90):
        trainer.state.global_step = step
        temperatures.append(trainer.current_temperature())
    assert temperatures[0] > 1 / 16 and temperatures[1:] == [pytest.approx(1 / 16)] * 2


def test_a_collapsing_codebook_is_reported_once_with_the_remedy(tmp_path, caplog):
    from transformers import TrainingArguments

    from hf_mim.data import MimDataCollator

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = DvaeTrainer(model=DvaeModel(DvaeConfig(**TINY)), args=args, data_collator=MimDataCollator())
    few_tokens, collapsed, healthy = torch.zeros(64, dtype=torch.long), torch.zeros(64, dtype=torch.long), torch.ones(64, dtype=torch.long) * 5
    few_tokens[:3] = 10  # 30 tokens for 64 codes say nothing about usage yet
    collapsed[:6] = 100
    with caplog.at_level("WARNING", logger="hf_mim.training.tokenizer_trainer"):
        for counts in (few_tokens, healthy, collapsed, collapsed):
            trainer._code_counts["train"] = counts
            trainer._pop_codebook_metrics("train", "")
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1, warnings
    assert "6 of 64 codes" in warnings[0] and "--code_balance_rate" in warnings[0]


@pytest.mark.slow
def test_two_process_balancing_keeps_the_replicas_identical(tmp_path, image_folder):
    # Balancing moves the encoder's biases outside the gradient, so DDP's all-reduce does not keep them in step: the
    # step's code counts must be reduced over processes first. With a high rate and learning rate 0, the biases
    # move only by balancing, by the counts of different images on each process.
    (tmp_path / "train_and_dump.py").write_text(textwrap.dedent(
        """
        import torch
        from hf_mim.cli import run_command
        from hf_mim.training import dvae, train_tokenizer

        original_train = dvae.DvaeTrainer.train

        def train(self, *args, **kwargs):
            result = original_train(self, *args, **kwargs)
            bias = self.accelerator.unwrap_model(self.model).encoder.output_conv.bias
            torch.save(bias.detach().clone(), f"{self.args.output_dir}/bias_rank{self.args.process_index}.pt")
            return result

        dvae.DvaeTrainer.train = train
        run_command(train_tokenizer.main)  # as the script: it ends the process group before exit
        """
    ))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", "29541", str(tmp_path / "train_and_dump.py")]
    args = [
        "--tokenizer_type", "dvae", "--config_overrides", ",".join(f"{key}={value}" for key, value in TINY.items()),
        "--train_dir", image_folder, "--output_dir", str(tmp_path / "out"), "--do_train", "--max_steps", "3",
        "--per_device_train_batch_size", "2", "--learning_rate", "0", "--code_balance_rate", "0.5",
        "--save_strategy", "no", "--report_to", "none", "--use_cpu", "--dataloader_num_workers", "0", "--seed", "0",
    ]  # fmt: skip
    completed = subprocess.run(launch + args, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 0, completed.stderr[-4000:]
    rank0, rank1 = (torch.load(tmp_path / "out" / f"bias_rank{rank}.pt") for rank in (0, 1))
    assert torch.equal(rank0, rank1)
    assert rank0.abs().max() > 0  # the biases start at 0; balancing moved them


def test_the_kl_weight_defaults_to_the_measured_one():
    # The README's codebook-usage measurements ran at 1e-2; 1e-3 left half the codes unused.
    import inspect

    from hf_mim.training.dvae import DvaeTrainer
    from hf_mim.training.tokenizer_training import TokenizerArguments

    assert inspect.signature(DvaeTrainer.__init__).parameters["kl_weight"].default == 1e-2
    assert TokenizerArguments.__dataclass_fields__["kl_weight"].default == 1e-2
