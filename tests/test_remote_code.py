"""Checkpoints load through the Auto classes with trust_remote_code where hf_mim cannot be imported."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import BLOCK_HF_MIM, TINY_CONFIGS, tiny_beit_config, tiny_dvae_config
from safetensors.torch import load_file

from hf_mim import BeitMimForMaskedImageModeling, DvaeImageProcessor, DvaeModel, MimImageProcessor

# Runs in a fresh interpreter: any attempt to import hf_mim raises, so only the copied code files can serve.
LOADER = BLOCK_HF_MIM + textwrap.dedent(
    """
    import json
    import torch
    from transformers import AutoImageProcessor, AutoModel, AutoModelForMaskedImageModeling

    folder, task = sys.argv[1], sys.argv[2]
    inputs = torch.load(folder + "/inputs.pt")
    result = {}
    encoder = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    result["encoder_class"] = type(encoder).__name__
    result["encoder_module"] = type(encoder).__module__
    with torch.no_grad():
        if task == "mim":
            model = AutoModelForMaskedImageModeling.from_pretrained(folder, trust_remote_code=True).eval()
            result["mim_class"] = type(model).__name__
            out = model(inputs["pixel_values"], bool_masked_pos=inputs["mask"],
                        tokenizer_pixel_values=inputs["tokenizer_pixel_values"])
            outputs = {"logits": out.logits, "labels": out.labels,
                       "hidden": encoder(inputs["pixel_values"]).last_hidden_state}
            try:
                outputs["decoded"] = model.tokenizer.decode(torch.zeros(1, model.tokenizer.num_tokens, dtype=torch.long))
            except (NotImplementedError, ValueError) as error:
                result["decode_error"] = str(error)
            torch.save(outputs, folder + "/remote.pt")
        else:
            torch.save({"logits": encoder.get_codebook_logits(inputs["pixel_values"])}, folder + "/remote.pt")
    processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    result["processor_class"] = type(processor).__name__
    result["processor_size"] = processor.size["height"]
    result["hf_mim_imported"] = any(name.split(".")[0] == "hf_mim" for name in sys.modules)
    print(json.dumps(result))
    """
)


def load_remotely(folder, task):
    env = {**os.environ, "HF_HOME": os.path.join(folder, "hf_home"), "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(
        [sys.executable, "-c", LOADER, str(folder), task], capture_output=True, text=True, env=env, cwd=folder,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1]), torch.load(os.path.join(folder, "remote.pt"))


@pytest.mark.smoke
def test_mim_checkpoint_loads_without_hf_mim(tmp_path):
    model = BeitMimForMaskedImageModeling(tiny_beit_config()).eval()
    model.save_pretrained(tmp_path)
    MimImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    inputs = {
        "pixel_values": torch.randn(2, 3, 32, 32),
        "tokenizer_pixel_values": torch.rand(2, 3, 16, 16),
        "mask": torch.rand(2, 16) < 0.5,
    }
    inputs["mask"][:, 0] = True
    torch.save(inputs, tmp_path / "inputs.pt")
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"]["AutoModel"] == "modeling_beit.BeitMimModel"

    result, remote = load_remotely(tmp_path, "mim")

    assert result["encoder_class"] == "BeitMimModel" and result["mim_class"] == "BeitMimForMaskedImageModeling"
    assert result["encoder_module"].startswith("transformers_modules.")
    assert result["processor_class"] == "MimImageProcessor" and result["processor_size"] == 32
    assert not result["hf_mim_imported"]
    with torch.no_grad():
        local = model(inputs["pixel_values"], bool_masked_pos=inputs["mask"],
                      tokenizer_pixel_values=inputs["tokenizer_pixel_values"])
        hidden = model.beit(inputs["pixel_values"]).last_hidden_state
    assert torch.equal(local.logits, remote["logits"]) and torch.equal(local.labels, remote["labels"])
    assert torch.equal(hidden, remote["hidden"])
    # The tokenizer came without its decoder, and says where to get one.
    held = {key.split(".")[1] for key in load_file(tmp_path / "model.safetensors") if key.startswith("tokenizer.")}
    assert held == {"encoder"}
    assert "built without its decoder" in result["decode_error"] and "standalone tokenizer" in result["decode_error"]


def test_mim_checkpoint_saved_with_its_tokenizer_decoder_loads_it_without_hf_mim(tmp_path):
    legacy = {name: value for name, value in tiny_dvae_config().to_dict().items() if name != "with_decoder"}
    model = BeitMimForMaskedImageModeling(tiny_beit_config(tokenizer_config=legacy)).eval()
    model.save_pretrained(tmp_path)
    MimImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[:, :4] = True
    inputs = {"pixel_values": torch.randn(1, 3, 32, 32), "tokenizer_pixel_values": torch.rand(1, 3, 16, 16), "mask": mask}
    torch.save(inputs, tmp_path / "inputs.pt")

    result, remote = load_remotely(tmp_path, "mim")

    assert "decode_error" not in result and not result["hf_mim_imported"]
    with torch.no_grad():
        assert torch.equal(model.tokenizer.decode(torch.zeros(1, 16, dtype=torch.long)), remote["decoded"])


def test_tokenizer_checkpoint_loads_without_hf_mim(tmp_path):
    tokenizer = DvaeModel(tiny_dvae_config()).eval()
    tokenizer.save_pretrained(tmp_path)
    DvaeImageProcessor(size={"height": 16, "width": 16}).save_pretrained(tmp_path)
    pixels = torch.rand(2, 3, 16, 16)
    torch.save({"pixel_values": pixels}, tmp_path / "inputs.pt")

    result, remote = load_remotely(tmp_path, "tokenizer")

    assert result["encoder_class"] == "DvaeModel" and result["processor_class"] == "DvaeImageProcessor"
    assert not result["hf_mim_imported"]
    with torch.no_grad():
        assert torch.equal(tokenizer.get_codebook_logits(pixels), remote["logits"])


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_every_model_tags_the_cards_transformers_writes_for_it(model_type):
    # `model.push_to_hub` writes transformers' default card with `model.model_tags`; each instance has its own list.
    from hf_mim.families import BY_MODEL_TYPE

    family = BY_MODEL_TYPE[model_type]
    model_class = getattr(family, "model_class", None) or family.tokenizer_class
    first, second = model_class(TINY_CONFIGS[model_type]()), model_class(TINY_CONFIGS[model_type]())
    assert {"hf_mim", "custom_code"} <= set(first.model_tags)
    first.add_model_tags(["mine"])
    assert "mine" not in second.model_tags


def test_the_tokenizer_view_of_a_pretraining_output_dir_loads_without_hf_mim(tiny_dvae_dir, image_folder, tmp_path):
    # Its card shows this call; the dVAE processor's code was only in the subfolder, where transformers does not look.
    from test_run_mim import run_mim_args

    from hf_mim.training.run_mim import main

    main(run_mim_args(tiny_dvae_dir, image_folder, tmp_path, "--max_steps", "1", "--save_strategy", "no"))
    loader = BLOCK_HF_MIM + textwrap.dedent(
        """
        from transformers import AutoImageProcessor
        processor = AutoImageProcessor.from_pretrained(sys.argv[1], subfolder="tokenizer", trust_remote_code=True)
        print(type(processor).__name__, processor.size["height"], any(name.startswith("hf_mim") for name in sys.modules))
        """
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run([sys.executable, "-c", loader, str(tmp_path)], capture_output=True, text=True, env=env,
                               cwd=tmp_path, timeout=300)  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.split() == ["DvaeImageProcessor", "16", "False"]
