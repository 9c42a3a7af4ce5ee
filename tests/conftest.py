"""Shared tiny fixtures: every model here is a few thousand parameters on 16-32 px images."""

import importlib
import json
import os
import socket
import subprocess
import sys

# Tests never reach the network; fail fast instead of waiting on a Hub request.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny tensors are dominated by thread synchronisation: on 2 cores (more so with DDP subprocesses and DataLoader
# workers running beside the test) extra intra-op threads make the suite many times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import psutil
import pytest
import torch
from PIL import Image

from hf_mim import (
    BeitMimConfig,
    BeitMimForMaskedImageModeling,
    DvaeConfig,
    DvaeImageProcessor,
    DvaeModel,
    FeatureKmeansConfig,
    KmeansConfig,
    McBeitConfig,
    MimImageProcessor,
    VqganConfig,
)

TINY_BACKBONE = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "image_size": 32,
    "patch_size": 8,
}


def tiny_dvae_config(**kwargs) -> DvaeConfig:
    """A dVAE whose 16 px view gives the 4x4 grid of a 32 px ViT with 8 px patches."""
    defaults = {"image_size": 16, "hidden_size": 8, "num_groups": 3, "codebook_size": 64, "decoder_hidden_size": 8}
    return DvaeConfig(**{**defaults, **kwargs})


def tiny_beit_config(**kwargs) -> BeitMimConfig:
    tokenizer = tiny_dvae_config()
    defaults = {**TINY_BACKBONE, "vocab_size": tokenizer.codebook_size, "tokenizer_config": tokenizer.to_dict()}
    return BeitMimConfig(**{**defaults, **kwargs})


def tiny_vqgan_config(**kwargs) -> VqganConfig:
    """A VQGAN encoder whose 16 px view gives the 4x4 grid of a 32 px ViT with 8 px patches."""
    defaults = {
        "image_size": 16,
        "hidden_size": 8,
        "channel_multipliers": [1, 1, 2],
        "attention_levels": [2],
        "z_channels": 8,
        "embed_dim": 8,
        "codebook_size": 64,
        "norm_num_groups": 4,
    }
    return VqganConfig(**{**defaults, **kwargs})


def tiny_mcbeit_config(tokenizer=None, **kwargs) -> McBeitConfig:
    """mc-BEiT on the tiny backbone; targets from `tokenizer` (a tokenizer config), by default the tiny VQGAN."""
    tokenizer = tokenizer if tokenizer is not None else tiny_vqgan_config()
    defaults = {**TINY_BACKBONE, "vocab_size": tokenizer.codebook_size, "tokenizer_config": tokenizer.to_dict()}
    return McBeitConfig(**{**defaults, **kwargs})


# A tiny ViT (32 px, 8 px patches: a 4x4 grid of 32-d features), the teacher of tiny feature k-means tokenizers.
TINY_TEACHER = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "image_size": 32,
    "patch_size": 8,
}


def tiny_feature_kmeans_config(**kwargs) -> FeatureKmeansConfig:
    """Feature k-means of a random tiny ViT teacher: 16 centroids of its 32-d features, a 4x4 grid of 32 px views."""
    from transformers import ViTConfig

    defaults = {
        "image_size": 32,
        "patch_size": 8,
        "codebook_size": 16,
        "feature_dim": 32,
        "teacher_config": ViTConfig(**TINY_TEACHER).to_dict(),
        "teacher_class": "ViTModel",
    }
    return FeatureKmeansConfig(**{**defaults, **kwargs})


# model_type -> factory of a tiny config of that family; tests that cover every registered family
# (tests/test_hub.py) build their models from here, so each new family adds its entry.
TINY_CONFIGS = {
    "hf_mim_beit": tiny_beit_config,
    "hf_mim_dvae": tiny_dvae_config,
    "hf_mim_vqgan": tiny_vqgan_config,
    "hf_mim_mcbeit": tiny_mcbeit_config,
    # Defined with their family's tests; imported on use (those modules import this one).
    "hf_mim_vqkd": lambda: importlib.import_module("test_vqkd").tiny_vqkd_config(kmeans_init=False),
    "hf_mim_beitv2": lambda: importlib.import_module("test_beitv2").tiny_beitv2_config(),
    "hf_mim_kmeans": lambda: KmeansConfig(image_size=32, patch_size=8, codebook_size=16),
    "hf_mim_feature_kmeans": tiny_feature_kmeans_config,
    "hf_mim_ccvit": lambda: importlib.import_module("test_ccvit").tiny_ccvit_config(
        tokenizer_config=KmeansConfig(image_size=32, patch_size=8, codebook_size=16).to_dict()
    ),
}

# Prepend to a `python -c` script: the process then fails on any import of hf_mim, so only code files
# that travelled with a checkpoint can serve it.
BLOCK_HF_MIM = """
import importlib.abc, sys

class BlockHfMim(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "hf_mim" or name.startswith("hf_mim."):
            raise ImportError("hf_mim is deliberately unavailable in this process")
        return None

sys.meta_path.insert(0, BlockHfMim())
"""


def free_port() -> int:
    """A TCP port free now, for a launch's --main_process_port: a fixed one can still be held (TIME_WAIT) by the
    previous launch of the same test, which then fails to bind."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_two_processes(script, args, cwd, timeout: int = 300) -> subprocess.CompletedProcess:
    """`script` run with `args` as 2-process DDP on the CPU (gloo), one thread each; a launch that hangs fails the
    test at `timeout` with its processes killed (a hung rank outlives its launcher)."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port()), str(script), *map(str, args)]  # fmt: skip
    process = subprocess.Popen(launch, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                               env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # The ranks run in sessions of their own (torchrun's), holding the output pipes open: kill every descendant.
        for child in [*psutil.Process(process.pid).children(recursive=True), process]:
            child.kill()
        stdout, stderr = process.communicate()
        pytest.fail(f"the 2-process launch of {script} hung for {timeout} s:\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(launch, process.returncode, stdout, stderr)


def two_process_evaluations(tmp_path, script, arguments, broken_files) -> list[dict]:
    """The `eval_results.json` of 2-process launches of `script` evaluating 6 validation photos, without and then
    with the undecodable `broken_files` (paths inside its class folders); `arguments(validation_dir, output_dir)`
    gives a launch's flags."""
    results = []
    for broken in ((), broken_files):
        validation, output = tmp_path / f"validation_{len(broken)}", tmp_path / f"out_{len(broken)}"
        write_images(validation, 6)
        for name in broken:
            (validation / name).write_bytes(b"not an image")
        completed = launch_two_processes(script, arguments(validation, output), cwd=tmp_path, timeout=240)
        assert completed.returncode == 0, completed.stderr[-4000:]
        results.append(json.loads((output / "eval_results.json").read_text()))
    return results


def write_images(folder, count: int, size=(40, 48), classes=("a", "b"), seed: int = 0) -> None:
    """An imagefolder of smooth random images (blurred noise compresses and tokenizes like photos, not static)."""
    rng = np.random.default_rng(seed)
    for index in range(count):
        directory = os.path.join(folder, classes[index % len(classes)])
        os.makedirs(directory, exist_ok=True)
        coarse = rng.random((4, 4, 3))
        image = Image.fromarray((coarse * 255).astype("uint8")).resize(size[::-1], Image.Resampling.BICUBIC)
        image.save(os.path.join(directory, f"{index:04d}.png"))


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_dvae_dir(tmp_path_factory):
    """A saved random tiny dVAE with its image processor: a tokenizer as `--tokenizer_name_or_path` expects."""
    path = tmp_path_factory.mktemp("tiny_dvae")
    DvaeModel(tiny_dvae_config()).save_pretrained(path)
    DvaeImageProcessor(size={"height": 16, "width": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("images")
    write_images(path, 24)
    return str(path)


@pytest.fixture(scope="session")
def tiny_mim_dir(tmp_path_factory):
    """A saved random tiny BEiT MIM checkpoint laid out as run_mim.py writes it: its 32 px image processor at the
    root, the dVAE's 16 px processor under `tokenizer/`. The shared relative position bias is random (it starts at
    zero), so that copying it per layer is visible."""
    path = tmp_path_factory.mktemp("tiny_mim")
    torch.manual_seed(0)
    model = BeitMimForMaskedImageModeling(tiny_beit_config())
    with torch.no_grad():
        model.beit.shared_position_bias.relative_position_bias_table.normal_()
    model.save_pretrained(path)
    MimImageProcessor(size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    DvaeImageProcessor(size={"height": 16, "width": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(
        path / "tokenizer"
    )
    return str(path)


def assert_hf_mim_card(folder) -> None:
    """`folder/README.md` is an hf_mim model card whose metadata the Hub understands."""
    from huggingface_hub import ModelCard

    data = ModelCard.load(os.path.join(folder, "README.md")).data
    assert data.library_name == "transformers"
    assert {"hf_mim", "custom_code"} <= set(data.tags)
