"""Checkpoints written by hf_mim at commit f10a5aa keep loading, with hf_mim and without it, to the outputs they had.

The fixtures (tests/fixtures/checkpoints_f10a5aa/, written by tests/fixtures/make_checkpoints.py from that commit) are
tiny checkpoints of every family: each tokenizer (dVAE and VQ-KD also without their decoder) and each MIM model with
its tokenizer (with and without the tokenizer's decoder). Each is loaded through the Auto classes three ways:

- `hf_mim`: hf_mim imported, its registered classes serve the old configs and weights (no remote code);
- `saved_code`: hf_mim unavailable, `trust_remote_code=True` runs the code files the checkpoint was saved with (those
  of its `tokenizer/` view also at the root, as `hf-mim push` uploads them);
- `current_code`: hf_mim unavailable, the checkpoint's code files replaced by today's, as pushing an old folder without
  its code files completes them (`hf_mim.checkpoint_folder.complete_code_files`).

and must reproduce the recorded outputs: token ids exactly, logits, decoded images and MIM outputs to float tolerance.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import BLOCK_HF_MIM
from safetensors.torch import load_file

from hf_mim.checkpoint_folder import complete_code_files

FIXTURES = Path(__file__).parent / "fixtures" / "checkpoints_f10a5aa"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
NAMES = sorted(MANIFEST["fixtures"])
MIM_INPUTS = ("pixel_values", "bool_masked_pos", "bool_replaced_pos", "tokenizer_pixel_values")

# Loads every checkpoint folder under argv[2] and writes its outputs to argv[3]/<name>.safetensors, with a JSON report
# of the classes and load reports on the last line of stdout. Prepended with BLOCK_HF_MIM when hf_mim must not serve.
LOADER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoImageProcessor, AutoModel, AutoModelForMaskedImageModeling

    mode, root, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    if mode == "hf_mim":
        import hf_mim  # registers the hf_mim_* model types with the Auto classes
    remote = mode != "hf_mim"
    report = {}
    for folder in sorted(path for path in root.iterdir() if path.is_dir()):
        expected = load_file(folder / "expected.safetensors")
        is_mim = "bool_masked_pos" in expected
        auto_class = AutoModelForMaskedImageModeling if is_mim else AutoModel
        model = auto_class.from_pretrained(folder, trust_remote_code=remote).eval()
        # The load report from the weights file itself (the saved code's from_pretrained has no output_loading_info).
        saved, held = set(load_file(folder / "model.safetensors")), set(model.state_dict())
        entry = {
            "class": type(model).__name__,
            "module": type(model).__module__,
            "load_problems": {"missing": sorted(held - saved), "unexpected": sorted(saved - held)},
            "processors": [type(AutoImageProcessor.from_pretrained(folder, trust_remote_code=remote)).__name__],
        }
        outputs = {}
        with torch.no_grad():
            if is_mim:
                inputs = {key: expected[key] for key in %r if key in expected}
                outputs.update((key, value) for key, value in model(**inputs).items() if isinstance(value, torch.Tensor))
                encoder = AutoModel.from_pretrained(folder, trust_remote_code=remote).eval()
                entry["encoder_class"] = type(encoder).__name__
                outputs["hidden"] = encoder(expected["pixel_values"]).last_hidden_state
                if (folder / "tokenizer").is_dir():
                    view = AutoImageProcessor.from_pretrained(folder, subfolder="tokenizer", trust_remote_code=remote)
                    entry["processors"].append(type(view).__name__)
            else:
                outputs["logits"] = model.get_codebook_logits(expected["pixel_values"])
                outputs["indices"] = model.get_codebook_indices(expected["pixel_values"])
                if "decoded" in expected:
                    outputs["decoded"] = model.decode(expected["indices"])
        save_file({key: value.contiguous() for key, value in outputs.items()}, out / f"{folder.name}.safetensors")
        report[folder.name] = entry
    report["hf_mim_imported"] = any(name.split(".")[0] == "hf_mim" for name in sys.modules)
    print(json.dumps(report))
    """
    % (MIM_INPUTS,)
)


def copy_fixture(name: str, target: Path, with_saved_code: bool) -> Path:
    folder = target / name
    shutil.copytree(FIXTURES / name, folder)
    if with_saved_code:
        for relative in MANIFEST["fixtures"][name]["code_files"]:
            shutil.copyfile(FIXTURES / "code" / f"{Path(relative).name}.txt", folder / relative)
    # As `hf-mim push` uploads the folder: code that only a subfolder holds (a MIM checkpoint's tokenizer/ view) is
    # also put at the root, where transformers looks for it; missing files come from today's hf_mim.
    complete_code_files(folder)
    return folder


def run_loader(mode: str, root: Path, out: Path) -> dict:
    out.mkdir()
    script = (BLOCK_HF_MIM if mode != "hf_mim" else "") + LOADER
    env = {**os.environ, "HF_HOME": str(root.parent / f"hf_home_{mode}"), "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(
        [sys.executable, "-c", script, mode, str(root), str(out)], capture_output=True, text=True, env=env,
        cwd=root, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module", params=["hf_mim", "saved_code", "current_code"])
def loaded(request, tmp_path_factory):
    """(mode, report, outputs folder) of loading every fixture in one process."""
    mode = request.param
    base = tmp_path_factory.mktemp(mode)
    root = base / "checkpoints"
    root.mkdir()
    for name in NAMES:
        copy_fixture(name, root, with_saved_code=mode == "saved_code")
    return mode, run_loader(mode, root, base / "outputs"), base / "outputs"


def test_fixtures_cover_every_family_and_stay_small():
    model_types = {json.loads((FIXTURES / name / "config.json").read_text())["model_type"] for name in NAMES}
    assert model_types == {
        "hf_mim_dvae", "hf_mim_vqkd", "hf_mim_vqgan", "hf_mim_kmeans",
        "hf_mim_beit", "hf_mim_beitv2", "hf_mim_mcbeit", "hf_mim_ccvit",
    }
    assert sum(path.stat().st_size for path in FIXTURES.rglob("*") if path.is_file()) < 1_000_000


def assert_loaded_as_recorded(mode: str, report: dict, name: str, expected_file: Path, outputs: Path) -> None:
    """The `run_loader` `report` and outputs of checkpoint `name` match what `expected_file` recorded."""
    entry = report[name]
    assert report["hf_mim_imported"] == (mode == "hf_mim")
    assert entry["module"].startswith("hf_mim." if mode == "hf_mim" else "transformers_modules.")
    assert entry["load_problems"] == {"missing": [], "unexpected": []}, f"{name}: {entry['load_problems']}"
    expected = load_file(expected_file)
    actual = load_file(outputs / f"{name}.safetensors")
    recorded = set(expected) - set(MIM_INPUTS)
    assert recorded == set(actual)
    for key in sorted(recorded):
        if expected[key].is_floating_point():
            torch.testing.assert_close(actual[key], expected[key], rtol=1e-4, atol=1e-5, msg=f"{name}: {key}")
        else:
            assert torch.equal(actual[key], expected[key]), f"{name}: {key} differs"


@pytest.mark.parametrize("name", NAMES)
def test_old_checkpoint_loads_to_its_recorded_outputs(loaded, name):
    mode, report, outputs = loaded
    assert_loaded_as_recorded(mode, report, name, FIXTURES / name / "expected.safetensors", outputs)
