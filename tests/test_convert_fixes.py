"""Converters against the official files (issue 15): a pytorch-lightning 1.0 `last.ckpt` read without Lightning, the
stochastic depth each method pre-trained with, VQ-KD codebook rows re-normalised, and user mistakes as one line."""

import argparse
import importlib.util
import json
import logging
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_convert_unilm import beit_state, ref_vqkd, vqkd_state
from test_vqgan import REPO, TINY, random_taming_state_dict, taming_reference_logits
from transformers import AutoConfig

from hf_mim import KmeansConfig, KmeansImageProcessor, KmeansModel
from hf_mim.cli import run_command
from hf_mim.convert.taming import convert_taming_checkpoint, load_taming_state_dict
from hf_mim.convert.unilm import convert_beit_checkpoint, convert_vqkd_checkpoint, pretraining_drop_path_rate
from hf_mim.errors import UsageError

# --------------------------------------------------------------------------------- a pytorch-lightning 1.0 last.ckpt

LIGHTNING_MODULES = (
    "pytorch_lightning",
    "pytorch_lightning.callbacks",
    "pytorch_lightning.callbacks.model_checkpoint",
    "pytorch_lightning.utilities",
    "pytorch_lightning.utilities.parsing",
)


def _explode(*args, **kwargs):
    pytest.fail("code of a pickled Lightning class ran while converting")


def fake_lightning():
    """Modules named like pytorch_lightning 1.0.8's, holding the classes a `last.ckpt` pickles by name."""

    class ModelCheckpoint:
        def __init__(self, monitor=None, dirpath=None):
            self.monitor, self.dirpath, self.best_model_score = monitor, dirpath, torch.tensor(0.5)

        __setstate__ = _explode

    class AttributeDict(dict):
        def __getattr__(self, key):
            try:
                return self[key]
            except KeyError as error:
                raise AttributeError(key) from error

    modules = {name: types.ModuleType(name) for name in LIGHTNING_MODULES}
    for module, cls in (("pytorch_lightning.callbacks.model_checkpoint", ModelCheckpoint),
                        ("pytorch_lightning.utilities.parsing", AttributeDict)):
        cls.__module__, cls.__qualname__ = module, cls.__name__
        setattr(modules[module], cls.__name__, cls)
    return modules, ModelCheckpoint, AttributeDict


def save_lightning_checkpoint(path, state_dict, extra_hyper_parameters=None):
    """What PL 1.0.8's `dump_checkpoint` writes for taming's GumbelVQ: callback state keyed by the callback *class*,
    optimizer states, and (here, to cover other trainers) Lightning/argparse objects in `hyper_parameters`; saved
    while the fake `pytorch_lightning` is importable, which is removed again before anything reads the file."""
    modules, ModelCheckpoint, AttributeDict = fake_lightning()
    sys.modules.update(modules)
    try:
        checkpoint = {
            "epoch": 11,
            "global_step": 400_000,
            "pytorch-lightning_version": "1.0.8",
            "callbacks": {
                ModelCheckpoint: {
                    "monitor": "val/rec_loss",
                    "best_model_score": torch.tensor(0.0712),
                    "best_model_path": "logs/2021-01-01T00-00-00_openimages_f8/checkpoints/last.ckpt",
                    "current_score": torch.tensor(0.0713),
                    "dirpath": "logs/2021-01-01T00-00-00_openimages_f8/checkpoints",
                }
            },
            "optimizer_states": [{"state": {0: {"step": 10, "exp_avg": torch.zeros(2)}},
                                  "param_groups": [{"lr": 4.5e-6, "betas": (0.5, 0.9), "params": [0]}]}],
            "lr_schedulers": [],
            "state_dict": state_dict,
            "hparams_name": "kwargs",
            "hyper_parameters": AttributeDict(
                embed_dim=8, n_embed=64, kl_weight=1e-8,
                args=argparse.Namespace(base=["configs/openimages_f8.yaml"], gpus="0,1"),
                checkpoint_callback=ModelCheckpoint(monitor="val/rec_loss", dirpath="checkpoints"),
                **(extra_hyper_parameters or {}),
            ),
        }
        torch.save(checkpoint, path)
    finally:
        for name in modules:
            del sys.modules[name]


def test_lightning_1_0_checkpoint_is_read_without_lightning(tmp_path):
    state_dict = random_taming_state_dict(**TINY)
    path = tmp_path / "last.ckpt"
    save_lightning_checkpoint(path, state_dict)
    assert not any(name.startswith("pytorch_lightning") for name in sys.modules)
    # The file reproduces the issue: plain weights-only loading refuses the callback class.
    with pytest.raises(pickle.UnpicklingError, match="pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"):
        torch.load(path, map_location="cpu", weights_only=True)

    safe_globals_before = torch.serialization.get_safe_globals()
    loaded = load_taming_state_dict(path)
    assert loaded.keys() == state_dict.keys() and all(torch.equal(loaded[k], state_dict[k]) for k in state_dict)
    assert not any(name.startswith("pytorch_lightning") for name in sys.modules)
    model = convert_taming_checkpoint(path, output_dir=tmp_path / "vqgan", image_size=16)
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    expected = taming_reference_logits(state_dict, pixels, TINY["ch_mult"], 2, TINY["attn_levels"], groups=32)
    with torch.no_grad():
        torch.testing.assert_close(model.get_codebook_logits(pixels), expected, rtol=1e-4, atol=1e-5)
    # Reading it left nothing allowed for later loads.
    assert set(map(str, torch.serialization.get_safe_globals())) == set(map(str, safe_globals_before))


class RunsShellCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_malicious_global_in_a_lightning_checkpoint_is_refused_unrun(tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = tmp_path / "last.ckpt"
    save_lightning_checkpoint(path, random_taming_state_dict(**TINY), {"logger": RunsShellCommand(marker)})
    with pytest.raises(UsageError, match=r"refused it: it pickles '(posix|nt|os)\.system'.*nothing from the file was run"):
        convert_taming_checkpoint(path, output_dir=tmp_path / "out", image_size=16)
    assert not marker.exists() and not (tmp_path / "out").exists()
    # Through the script: one line, status 2.
    script = load_script("convert_taming_to_hf_mim.py")
    with pytest.raises(SystemExit) as exit_info:
        run_command(script.main, ["--checkpoint", str(path), "--output_dir", str(tmp_path / "out"), "--image_size", "16"])
    assert exit_info.value.code == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith(f"error: --checkpoint {path}: torch.load(weights_only=True) refused")
    assert not marker.exists()


# ------------------------------------------------------------------------------------------- pre-training drop path


@pytest.mark.parametrize(
    ("file_name", "head_layers", "method", "args", "expected", "model_type", "source"),
    [
        ("beit_base_patch16_224_pt22k.pth", 0, None, None, 0.1, "hf_mim_beit", "BEiT's pre-training recipe"),
        ("beitv2_base_patch16_224_pt1k.pth", 2, None, None, 0.1, "hf_mim_beitv2", "1600-epoch"),
        ("beitv2_base_patch16_224_pt1k_300e.pth", 2, None, None, 0.0, "hf_mim_beitv2", "300-epoch"),
        ("mcbeit_base.pth", 0, "mcbeit", None, 0.1, "hf_mim_mcbeit", "mc-BEiT's pre-training recipe"),
        ("checkpoint-299.pth", 2, None, argparse.Namespace(drop_path=0.0, epochs=300), 0.0, "hf_mim_beitv2", "args"),
    ],
)
def test_converted_config_records_the_pretraining_drop_path(tmp_path, caplog, file_name, head_layers, method, args,
                                                            expected, model_type, source):
    torch.manual_seed(0)
    checkpoint = {"model": beit_state(head_layers=head_layers)}
    if args is not None:
        checkpoint["args"] = args
    torch.save(checkpoint, tmp_path / file_name)
    with caplog.at_level(logging.INFO, logger="hf_mim.convert.unilm"):
        model = convert_beit_checkpoint(tmp_path / file_name, tmp_path / "out", method=method)
    assert model.config.model_type == model_type and model.config.drop_path_rate == expected
    assert f"drop_path_rate={expected:g}" in caplog.text and source in caplog.text
    reloaded = AutoConfig.from_pretrained(tmp_path / "out")
    assert reloaded.model_type == model_type and reloaded.drop_path_rate == expected


def test_drop_path_rate_can_be_overridden(tmp_path):
    torch.save({"model": beit_state(head_layers=2)}, tmp_path / "beitv2.pth")
    model = convert_beit_checkpoint(tmp_path / "beitv2.pth", tmp_path / "out", drop_path_rate=0.05)
    assert model.config.drop_path_rate == 0.05
    assert json.loads((tmp_path / "out" / "config.json").read_text())["drop_path_rate"] == 0.05
    script = load_script("convert_beit_to_hf_mim.py")
    script.main(["--checkpoint", str(tmp_path / "beitv2.pth"), "--output_dir", str(tmp_path / "cli"),
                 "--drop_path_rate", "0"])
    assert AutoConfig.from_pretrained(tmp_path / "cli").drop_path_rate == 0.0
    torch.save({"model": beit_state()}, tmp_path / "beit.pth")
    script.main(["--checkpoint", str(tmp_path / "beit.pth"), "--output_dir", str(tmp_path / "mc"), "--method", "mcbeit"])
    assert AutoConfig.from_pretrained(tmp_path / "mc").model_type == "hf_mim_mcbeit"


def test_recipe_table():
    assert pretraining_drop_path_rate("beit")[0] == 0.1
    assert pretraining_drop_path_rate("beitv2", checkpoint_name="beitv2_large_patch16_224_pt1k_300e.pth")[0] == 0.0
    assert pretraining_drop_path_rate("beitv2", checkpoint_name="beitv2_large_patch16_224_pt1k.pth")[0] == 0.1
    assert pretraining_drop_path_rate("mcbeit")[0] == 0.1
    assert pretraining_drop_path_rate("beit", {"drop_path": 0.3})[0] == 0.3


# --------------------------------------------------------------------------------------- VQ-KD codebook row norms


def test_vqkd_rows_off_unit_length_are_renormalised_so_tokens_match_squared_distance(tmp_path):
    torch.manual_seed(0)
    state = vqkd_state(codes=512, code_dim=8)
    rows = state["quantize.embedding.weight"]
    # Norms 1 +- 0.999e-3: inside the converter's tolerance, like codebooks stored at reduced precision.
    signs = torch.randint(0, 2, (len(rows), 1)).float() * 2 - 1
    state["quantize.embedding.weight"] = rows * (1 + 0.999e-3 * signs)
    torch.save({"model": state}, tmp_path / "vqkd.pth")
    model = convert_vqkd_checkpoint(tmp_path / "vqkd.pth", num_attention_heads=2, decoder_attention_heads=2)
    norms = model.codebook.weight.norm(dim=-1)
    assert (norms - 1).abs().max() < 1e-6

    pixels = torch.rand(24, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    unit_state = {**state, "quantize.embedding.weight": F.normalize(state["quantize.embedding.weight"], dim=-1)}
    with torch.no_grad():
        tokens, decoded = ref_vqkd(unit_state, pixels)
        assert torch.equal(model.get_codebook_indices(pixels), tokens)
        assert torch.allclose(model(pixels).predicted_features, decoded, atol=1e-4)
        # The comparison can tell: scoring the raw rows by their dot product (no re-normalisation) picks other codes.
        features = model.get_codebook_logits(pixels) / model.config.logit_scale  # cosines to the unit rows
        raw_scores = features * state["quantize.embedding.weight"].norm(dim=-1)
    assert (raw_scores.argmax(-1) != tokens).sum() > 0


# ------------------------------------------------------------------------------------------- mistakes: one line each


def load_script(name):
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), REPO / "scripts" / name)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert_mistakes")
    torch.manual_seed(0)
    torch.save({"model": beit_state()}, root / "beit.pth")
    torch.save(beit_state(), root / "beit_state_dict.pt")
    torch.save({"model": vqkd_state()}, root / "vqkd.pth")
    (root / "notes.txt").write_text("not a checkpoint\n")
    (root / "folder").mkdir()
    (root / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    torch.save({"model": {"lr": 0.1}}, root / "no_tensors.pth")
    torch.save({"blocks.input.w": torch.zeros(1), "hook": RunsShellCommand(root / "pwned")}, root / "evil.pkl")
    torch.save({"epochs": 3}, root / "no_tensors.pkl")
    np.save(root / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(root / "cube.npy", np.zeros((2, 3, 4), dtype=np.float32))
    np.save(root / "centroids.npy", np.random.rand(16, 48).astype(np.float32))
    kmeans = KmeansModel(KmeansConfig(image_size=32, patch_size=8, codebook_size=16))
    kmeans.save_pretrained(root / "kmeans16")
    KmeansImageProcessor.for_config(kmeans.config).save_pretrained(root / "kmeans16")
    return root


CASES = {
    "missing checkpoint": ("convert_beit_to_hf_mim.py", ["--checkpoint", "{root}/nowhere.pth"],
                           "--checkpoint {root}/nowhere.pth: no such file; pass a unilm .pth"),
    "a folder as checkpoint": ("convert_vqkd_to_hf_mim.py", ["--checkpoint", "{root}/folder"],
                               "--checkpoint {root}/folder is a folder, not a file"),
    "a text file": ("convert_beit_to_hf_mim.py", ["--checkpoint", "{root}/notes.txt"],
                    "--checkpoint {root}/notes.txt is not a PyTorch checkpoint"),
    "no tensors": ("convert_beit_to_hf_mim.py", ["--checkpoint", "{root}/no_tensors.pth"],
                   "--checkpoint {root}/no_tensors.pth is not a unilm checkpoint"),
    "a VQ-KD as BEiT": ("convert_beit_to_hf_mim.py", ["--checkpoint", "{root}/vqkd.pth"],
                        "--checkpoint {root}/vqkd.pth: The BEiT checkpoint has no"),
    "a BEiT as VQ-KD": ("convert_vqkd_to_hf_mim.py", ["--checkpoint", "{root}/beit.pth"],
                        "--checkpoint {root}/beit.pth: The VQ-KD checkpoint has no"),
    "early_layers of BEiT v1": ("convert_beit_to_hf_mim.py", ["--checkpoint", "{root}/beit.pth", "--early_layers", "2"],
                                "--early_layers only applies to BEiT v2 checkpoints"),
    "heads contradicting the table": ("convert_beit_to_hf_mim.py",
                                      ["--checkpoint", "{root}/beit.pth", "--num_attention_heads", "4"],
                                      "--num_attention_heads 4: the backbone has 2 attention heads"),
    "heads that do not divide the width": ("convert_vqkd_to_hf_mim.py",
                                           ["--checkpoint", "{root}/vqkd.pth", "--num_attention_heads", "5",
                                            "--decoder_attention_heads", "2"],
                                           "--num_attention_heads/--decoder_attention_heads: VqkdConfig.hidden_size=32"),
    "decoder heads unknown": ("convert_vqkd_to_hf_mim.py", ["--checkpoint", "{root}/vqkd.pth", "--num_attention_heads", "2"],
                              "pass the number of heads (--decoder_attention_heads)"),
    "missing tokenizer": ("convert_beit_to_hf_mim.py",
                          ["--checkpoint", "{root}/beit.pth", "--tokenizer_name_or_path", "./no-such-tokenizer"],
                          "--tokenizer_name_or_path ./no-such-tokenizer: no such folder"),
    "a tokenizer of another codebook": ("convert_beit_to_hf_mim.py",
                                        ["--checkpoint", "{root}/beit.pth", "--tokenizer_name_or_path", "{root}/kmeans16"],
                                        "--tokenizer_name_or_path {root}/kmeans16 has 16 codes, but the checkpoint's "
                                        "LM head predicts 64: pass the tokenizer it was pre-trained with"),
    "an image_mean of two channels": ("convert_beit_to_hf_mim.py",
                                      ["--checkpoint", "{root}/beit.pth", "--image_mean", "0.5", "0.5"],
                                      "--image_mean takes 3 values (R G B), got 2: 0.5 0.5"),
    "an image_mean on the 0-255 scale": ("convert_beit_to_hf_mim.py",
                                         ["--checkpoint", "{root}/beit.pth", "--image_mean", "123.7", "116.3", "103.5"],
                                         "--image_mean 123.7 116.3 103.5: the statistics are of pixels in [0, 1]"),
    "a zero image_std": ("convert_beit_to_hf_mim.py", ["--checkpoint", "{root}/beit.pth", "--image_std", "0.5", "0", "0.5"],
                         "--image_std 0.5 0.0 0.5: each std must be positive"),
    "a v1 checkpoint as beitv2": ("convert_beit_to_hf_mim.py", ["--checkpoint", "{root}/beit.pth", "--method", "beitv2"],
                                  "--method beitv2: the checkpoint is a BEiT one"),
    "a unilm file as taming": ("convert_taming_to_hf_mim.py", ["--checkpoint", "{root}/beit.pth"],
                               "--checkpoint {root}/beit.pth holds no state dict (expected a Lightning checkpoint"),
    "a BEiT state dict as taming": ("convert_taming_to_hf_mim.py", ["--checkpoint", "{root}/beit_state_dict.pt"],
                                    "--checkpoint {root}/beit_state_dict.pt: The checkpoint has no 'quantize.proj.weight'"),
    "broken safetensors": ("convert_taming_to_hf_mim.py", ["--checkpoint", "{root}/broken.safetensors"],
                           "--checkpoint {root}/broken.safetensors is not a readable .safetensors file"),
    "missing encoder.pkl": ("convert_dalle_to_hf_mim.py", ["--encoder", "{root}/encoder.pkl"],
                            "--encoder {root}/encoder.pkl: no such file; pass OpenAI's encoder.pkl"),
    "a pickle of other things": ("convert_dalle_to_hf_mim.py", ["--encoder", "{root}/no_tensors.pkl"],
                                 "--encoder {root}/no_tensors.pkl holds a dict, not a pickled dall_e.encoder.Encoder"),
    "a malicious encoder.pkl": ("convert_dalle_to_hf_mim.py", ["--encoder", "{root}/evil.pkl"],
                                "--encoder {root}/evil.pkl: Refusing to unpickle the global"),
    "missing centroids": ("convert_ccvit_to_hf_mim.py", ["--centroids", "{root}/centroids_missing.npy"],
                          "--centroids {root}/centroids_missing.npy: no such file"),
    "an object array": ("convert_ccvit_to_hf_mim.py", ["--centroids", "{root}/objects.npy"],
                        "--centroids {root}/objects.npy is not a .npy array"),
    "a file of another kind as centroids": ("convert_ccvit_to_hf_mim.py", ["--centroids", "{root}/broken.safetensors"],
                              "--centroids {root}/broken.safetensors is not a .npy file (no numpy header)"),
    "a 3-d array": ("convert_ccvit_to_hf_mim.py", ["--centroids", "{root}/cube.npy"],
                    "--centroids {root}/cube.npy holds a float32 array of shape (2, 3, 4)"),
    "image_size off the patch grid": ("convert_ccvit_to_hf_mim.py",
                                      ["--centroids", "{root}/centroids.npy", "--image_size", "30"],
                                      "--image_size 30:"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_a_conversion_mistake_ends_with_one_line_naming_the_fix(files, case, capsys):
    script_name, args, fragment = CASES[case]
    script = load_script(script_name)
    argv = [arg.format(root=files) for arg in args] + ["--output_dir", str(files / "out" / case.replace(" ", "_"))]
    with pytest.raises(SystemExit) as exit_info:
        run_command(script.main, argv)
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert exit_info.value.code == 2
    assert len(errors) == 1 and fragment.format(root=files) in errors[0], stderr[-2000:]
    assert "Traceback" not in stderr
    assert not (files / "out" / case.replace(" ", "_")).exists()
    assert not (files / "pwned").exists()
