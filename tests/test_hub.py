"""Sharing on the Hub: model cards, upload folders, and round trips through a local Hub-compatible server.

Pushes and loads run in subprocesses whose environment points huggingface_hub at the server before it
is imported (this process runs with HF_HUB_OFFLINE=1); loaders cannot import hf_mim, so only the
files that reached the server can serve them.
"""

import json
import os
import pathlib
import pickle
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest
import torch
import yaml
from conftest import BLOCK_HF_MIM, TINY_CONFIGS, tiny_beit_config
from fake_hub import FakeHub
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModel, AutoModelForMaskedImageModeling, TrainingArguments

from hf_mim import BeitMimForMaskedImageModeling, DvaeImageProcessor, MimImageProcessor
from hf_mim.hub import CardResult, render_model_card, write_model_card
from hf_mim.hub.cards import read_training_args, template_names
from hf_mim.checkpoint_folder import complete_code_files
from hf_mim.hub.push import prepare_upload_folder
from hf_mim.hub.push import main as push_main
from hf_mim.families import BY_MODEL_TYPE, FAMILIES

REPO = pathlib.Path(__file__).resolve().parents[1]
FAMILY_IDS = [family.model_type for family in FAMILIES]
TINY = "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64"


@pytest.fixture(scope="module")
def hub():
    with FakeHub(lifetime_s=900) as server:
        yield server
        assert not server.errors, server.errors


def run(args, env, cwd, timeout=300, hub=None):
    completed = subprocess.run(args, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    server = "" if hub is None else "\n".join(["", "last requests:", *hub.requests[-12:], *hub.errors])
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:] + server
    return completed


def client_env(hub, tmp_path):
    return {**os.environ, **hub.client_env(tmp_path / "hf_home"), "OMP_NUM_THREADS": "1"}


def front_matter(readme: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", readme, flags=re.DOTALL)
    assert match, readme[:500]
    return yaml.safe_load(match.group(1))


def python_snippets(readme: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)


def processor_for(config_dict: dict):
    """An image processor of the family of `config_dict`, sized for its view."""
    size = {"height": config_dict["image_size"], "width": config_dict["image_size"]}
    return BY_MODEL_TYPE[config_dict["model_type"]].image_processor_class(size=size, crop_size=size)


def save_tiny_checkpoint(family, folder) -> str:
    """A random tiny model of `family` saved with its image processor(s); returns "mim" or "tokenizer"."""
    if family.model_type not in TINY_CONFIGS:
        pytest.fail(f"No tiny config for {family.model_type}: add a factory to TINY_CONFIGS in tests/conftest.py")
    config = TINY_CONFIGS[family.model_type]()
    torch.manual_seed(0)
    model = family.model_class(config).eval()
    model.save_pretrained(folder)
    processor_for(config.to_dict()).save_pretrained(folder)
    tokenizer_config = getattr(config, "tokenizer_config", None)
    if tokenizer_config is not None:
        processor_for(tokenizer_config).save_pretrained(pathlib.Path(folder) / "tokenizer")
    return family.kind


# Loads pushed checkpoints where hf_mim cannot be imported, runs their cards' snippets, saves the outputs.
# One process serves every job (each start costs seconds); a failing job records its traceback.
LOADER = BLOCK_HF_MIM + textwrap.dedent(
    """
    import json, os, traceback
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel, AutoModelForMaskedImageModeling, BeitModel

    def load(job):
        hub = {"revision": job["revision"], "trust_remote_code": True}
        image = Image.open("image.jpg")
        out = {}
        processor = AutoImageProcessor.from_pretrained(job["repo_id"], **hub)
        out["pixel_values"] = processor(image, return_tensors="pt").pixel_values
        encoder = AutoModel.from_pretrained(job["repo_id"], **hub).eval()
        with torch.no_grad():
            if job["kind"] == "mim":
                out["hidden"] = encoder(out["pixel_values"]).last_hidden_state
                model = AutoModelForMaskedImageModeling.from_pretrained(job["repo_id"], **hub).eval()
                tokenizer_processor = AutoImageProcessor.from_pretrained(job["repo_id"], subfolder="tokenizer", **hub)
                out["tokenizer_pixel_values"] = tokenizer_processor(image, return_tensors="pt").pixel_values
                out["targets"] = model.get_targets(out["tokenizer_pixel_values"])
            else:
                out["logits"] = encoder.get_codebook_logits(out["pixel_values"])
        namespace = {}
        for snippet in job["snippets"]:
            exec(snippet, namespace)
        if job["snippets"] and job["kind"] == "mim":
            with torch.no_grad():
                stock = BeitModel.from_pretrained("stock-beit").eval()
                out["stock_hidden"] = stock(out["pixel_values"]).last_hidden_state
        out["encoder_module"] = type(encoder).__module__
        return out

    jobs, results = json.loads(sys.argv[1]), {}
    for job in jobs:
        os.chdir(job["workdir"])
        try:
            results[job["name"]] = load(job)
        except Exception:
            results[job["name"]] = {"error": traceback.format_exc()}
    results["hf_mim_imported"] = any(name.split(".")[0] == "hf_mim" for name in sys.modules)
    torch.save(results, sys.argv[2])
    """
)

# Pushes with hf_mim installed, in one process; a failing job records its traceback.
CLIENT = textwrap.dedent(
    """
    import json, sys, traceback
    from hf_mim.hub.push import main as push
    from hf_mim.training.run_image_classification import main as finetune
    from hf_mim.training.run_mim import main as run_mim

    jobs, errors = json.loads(sys.argv[1]), {}
    for name, argv in jobs:
        try:
            {"run_mim": run_mim, "finetune": finetune}.get(name, push)(argv)
        except Exception:
            errors[name] = traceback.format_exc()
    with open(sys.argv[2], "w") as file:
        json.dump(errors, file)
    """
)


def load_remotely(hub, folder, jobs) -> dict:
    """Run the loader on `jobs` (dicts with name, repo_id, revision, kind, snippets); returns name -> outputs."""
    for job in jobs:
        job["workdir"] = str(folder / job["name"])
        os.makedirs(job["workdir"], exist_ok=True)
        write_photo(pathlib.Path(job["workdir"]) / "image.jpg")
    run([sys.executable, "-c", LOADER, json.dumps(jobs), str(folder / "remote.pt")], client_env(hub, folder), folder, hub=hub)
    return torch.load(folder / "remote.pt")


def write_photo(path):
    coarse = np.random.default_rng(0).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    Image.fromarray(coarse).resize((40, 48), Image.Resampling.BICUBIC).save(path)


def local_outputs(folder, kind, image_path, processor_folder=None):
    """What hf_mim itself computes from `folder` (in this process, registered classes, no remote code)."""
    image = Image.open(image_path)
    processor_folder = processor_folder or folder
    out = {"pixel_values": AutoImageProcessor.from_pretrained(processor_folder)(image, return_tensors="pt").pixel_values}
    encoder = AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        if kind == "mim":
            out["hidden"] = encoder(out["pixel_values"]).last_hidden_state
            model = AutoModelForMaskedImageModeling.from_pretrained(folder).eval()
            tokenizer_processor = AutoImageProcessor.from_pretrained(processor_folder, subfolder="tokenizer")
            out["tokenizer_pixel_values"] = tokenizer_processor(image, return_tensors="pt").pixel_values
            out["targets"] = model.get_targets(out["tokenizer_pixel_values"])
        else:
            out["logits"] = encoder.get_codebook_logits(out["pixel_values"])
    return out


# ---- templates and cards (no server) -------------------------------------------------------------


def test_every_registered_family_has_a_card_template():
    shipped = set(template_names())
    # One template per family (all eight methods), each shipped from model_cards/ through the package link.
    assert shipped == {family.card_template for family in FAMILIES}
    assert shipped == {path.name for path in (REPO / "model_cards").glob("*.md")}
    assert (REPO / "src" / "hf_mim" / "hub" / "model_cards").resolve() == (REPO / "model_cards").resolve()


def test_wheel_ships_the_templates(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "model_cards", "src"):
        path = REPO / name
        copy = shutil.copytree if path.is_dir() else shutil.copy
        kwargs = {"symlinks": True, "ignore": shutil.ignore_patterns("__pycache__", "*.egg-info")} if path.is_dir() else {}
        copy(path, source / name, **kwargs)
    (source / "README.md").write_text("hf_mim\n")
    build = "from setuptools import build_meta; import sys; print(build_meta.build_wheel(sys.argv[1]))"
    run([sys.executable, "-c", build, str(tmp_path / "dist")], os.environ, source)
    wheel = zipfile.ZipFile(next((tmp_path / "dist").glob("*.whl")))
    shipped = {name.rsplit("/", 1)[1] for name in wheel.namelist() if name.startswith("hf_mim/hub/model_cards/")}
    assert shipped == {path.name for path in (REPO / "model_cards").iterdir()}


@pytest.mark.parametrize("model_type", FAMILY_IDS)
def test_card_metadata_and_sections(model_type, tmp_path):
    family = BY_MODEL_TYPE[model_type]
    kind = save_tiny_checkpoint(family, tmp_path)
    results = [CardResult("linear_probe", "tester/eval-images", 0.625), CardResult("knn", "tester/eval-images", 0.5)]
    card = render_model_card(tmp_path, repo_id="tester/tiny", datasets=["tester/images"], results=results)
    metadata = front_matter(str(card))

    assert metadata["library_name"] == "transformers"
    assert {"hf_mim", "custom_code", "masked-image-modeling", BY_MODEL_TYPE[model_type].card_tag} <= set(metadata["tags"])
    # Only encoders: the feature-extraction pipeline would return a tokenizer's loss.
    assert metadata.get("pipeline_tag") == ("image-feature-extraction" if family.kind == "mim" else None)
    assert metadata["license"] == "apache-2.0" and metadata["datasets"] == ["tester/images"]
    (entry,) = metadata["model-index"][0]["results"]
    assert entry["task"]["type"] == "image-classification" and entry["dataset"]["type"] == "tester/eval-images"
    assert [(metric["name"], metric["value"]) for metric in entry["metrics"]] == [
        ("Linear probe (frozen features)", 0.625),
        ("k-NN (frozen features)", 0.5),
    ]
    text = card.text
    assert "trust_remote_code=True" in text and '"tester/tiny"' in text
    assert "```bibtex" in text and "arxiv.org/abs/" in text
    assert "{{ " not in text and "{%" not in text and "fine-tuned version of" not in text
    if kind == "tokenizer":
        assert "get_codebook_indices" in text and "codes used" in text
    else:
        assert 'subfolder="tokenizer"' in text and "BeitModel(config" in text

    # Re-rendering without the options keeps what the folder's card already says.
    write_model_card(tmp_path, repo_id="tester/tiny", datasets=["tester/images"], results=results)
    again = front_matter(str(render_model_card(tmp_path, repo_id="tester/tiny")))
    assert again["datasets"] == ["tester/images"] and again["model-index"] == metadata["model-index"]


def test_card_shows_training_configuration_and_codebook_usage(tmp_path):
    family = BY_MODEL_TYPE["hf_mim_dvae"]
    save_tiny_checkpoint(family, tmp_path)
    torch.save(TrainingArguments(output_dir=str(tmp_path), learning_rate=3e-4, max_steps=40, seed=7), tmp_path / "training_args.bin")
    state = {
        "global_step": 40,
        "epoch": 2.5,
        "log_history": [
            {"step": 20, "loss": 0.5, "codebook_usage": 0.15625, "codebook_perplexity": 8.0},
            {"step": 40, "loss": 0.25, "codebook_usage": 0.75, "codebook_perplexity": 40.5, "reconstruction_loss": 0.125},
            {"step": 40, "train_runtime": 3.0, "train_loss": 0.375},
        ],
    }
    (tmp_path / "trainer_state.json").write_text(json.dumps(state))
    text = render_model_card(tmp_path).text
    assert "Trained for 40 optimisation steps (2.50 epochs) with the transformers `Trainer`." in text
    # Steps skipped for a non-finite loss are steps without an update: the card says how many.
    (tmp_path / "all_results.json").write_text(json.dumps({"train_skipped_nonfinite_steps": 3}))
    assert "`Trainer`, of which 3 had a non-finite loss and were skipped" in render_model_card(tmp_path).text
    assert "| `learning_rate` | 0.0003 |" in text and "| `max_steps` | 40 |" in text and "| `seed` | 7 |" in text
    assert "| `reconstruction_loss` | 0.125 |" in text
    assert "used 48 of them\n(75.0%, `codebook_usage`), with a codebook perplexity of 40.5 (`codebook_perplexity`" in text
    assert "your-username/" in text  # no repo id yet: a placeholder, never a wrong one


def test_card_shows_the_codebook_usage_of_the_evaluation_set(tmp_path):
    # A k-means fit has no training log: its usage is measured on the validation patches (all_results.json).
    family = BY_MODEL_TYPE["hf_mim_kmeans"]
    save_tiny_checkpoint(family, tmp_path)
    text = render_model_card(tmp_path).text
    assert "No usage was measured during training or evaluation." in text
    size = json.loads((tmp_path / "config.json").read_text())["codebook_size"]
    (tmp_path / "all_results.json").write_text(json.dumps({"eval_codebook_usage": 0.5, "eval_codebook_perplexity": 12.25}))
    text = render_model_card(tmp_path).text
    assert f"On its evaluation set it used {size // 2} of them\n(50.0%, `eval_codebook_usage`), with a codebook perplexity of 12.2" in text
    assert "No usage was measured" not in text and "training-log window" not in text


def test_training_args_are_read_without_running_pickled_code(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'owned'}",))

    path = tmp_path / "training_args.bin"
    torch.save({"learning_rate": 0.1, "payload": Exploit()}, path)
    fields = read_training_args(path)
    assert fields["learning_rate"] == 0.1 and not (tmp_path / "owned").exists()
    (tmp_path / "broken.bin").write_bytes(pickle.dumps([1, 2]))
    assert read_training_args(tmp_path / "broken.bin") is None


def test_upload_folder_is_complete_and_checked(tmp_path):
    folder = tmp_path / "ckpt"
    BeitMimForMaskedImageModeling(tiny_beit_config()).save_pretrained(folder)
    MimImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    DvaeImageProcessor(size={"height": 16, "width": 16}).save_pretrained(folder / "tokenizer")
    for junk in ("optimizer.pt", "rng_state.pth", "checkpoint-1/model.safetensors"):
        (folder / junk).parent.mkdir(exist_ok=True)
        (folder / junk).write_bytes(b"local only")
    os.remove(folder / "modeling_dvae.py")  # e.g. lost by a copy: restored from hf_mim
    torch.save(TrainingArguments(output_dir=str(folder), hub_token="hf_secret"), folder / "training_args.bin")

    files = prepare_upload_folder(folder, tmp_path / "upload", repo_id="tester/tiny")
    assert {"README.md", "config.json", "model.safetensors", "preprocessor_config.json", "modeling_beit.py",
            "modeling_dvae.py", "tokenizer/preprocessor_config.json"} <= set(files)
    # transformers looks for a subfolder processor's code at the repo root.
    assert "image_processing_dvae.py" in files
    assert not {"optimizer.pt", "rng_state.pth", "training_args.bin"} & set(files)
    assert not any(name.startswith("checkpoint-") for name in files)
    assert complete_code_files(tmp_path / "upload") == []

    with pytest.raises(FileExistsError, match="not empty"):
        prepare_upload_folder(folder, tmp_path / "upload", repo_id="tester/tiny")
    os.remove(folder / "preprocessor_config.json")
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        prepare_upload_folder(folder, tmp_path / "upload2")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "beit"}))
    with pytest.raises(ValueError, match="not an hf_mim one"):
        prepare_upload_folder(tmp_path / "other", tmp_path / "upload3")


def test_dry_run_writes_the_upload_folder(tmp_path, capsys):
    folder = tmp_path / "ckpt"
    family = BY_MODEL_TYPE["hf_mim_dvae"]
    save_tiny_checkpoint(family, folder)
    # What scripts/push_to_hub.py runs; with --dry_run nothing reaches the network (this process is offline).
    (tmp_path / "results.json").write_text(json.dumps([{"protocol": "knn", "dataset": "tester/images", "value": 0.5}]))
    push_main([str(folder), "--repo_id", "tester/tiny", "--dry_run", str(tmp_path / "upload"), "--dataset",
               "tester/images", "--tag", "tiny", "--results", str(tmp_path / "results.json")])  # fmt: skip
    assert "Dry run, nothing uploaded" in capsys.readouterr().out
    metadata = front_matter((tmp_path / "upload" / "README.md").read_text())
    assert "tiny" in metadata["tags"] and metadata["datasets"] == ["tester/images"]
    assert metadata["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.5
    assert (tmp_path / "upload" / "modeling_dvae.py").exists() and not (folder / "README.md").exists()
    (tmp_path / "results.json").write_text(json.dumps([{"protocol": "zero_shot", "dataset": "x", "value": 1}]))
    with pytest.raises(ValueError, match="Unknown evaluation protocol 'zero_shot'"):
        push_main([str(folder), "--repo_id", "tester/tiny", "--dry_run", str(tmp_path / "u2"), "--results",
                   str(tmp_path / "results.json")])  # fmt: skip
    assert (REPO / "scripts" / "push_to_hub.py").read_text().count("from hf_mim.hub.push import main") == 1


def test_dry_run_reports_what_the_push_flags_would_do(tmp_path, capsys):
    folder = tmp_path / "ckpt"
    save_tiny_checkpoint(BY_MODEL_TYPE["hf_mim_dvae"], folder)
    push_main([str(folder), "--repo_id", "tester/tiny", "--dry_run", str(tmp_path / "upload")])
    assert "in one commit 'Upload ckpt with hf_mim' to main of tester/tiny, the repo (public if created):" in (
        capsys.readouterr().out
    )
    push_main([str(folder), "--repo_id", "tester/tiny", "--dry_run", str(tmp_path / "upload2"), "--private",
               "--revision", "v2", "--commit_message", "second run"])  # fmt: skip
    assert (
        "in one commit 'second run' to branch v2 (created from main if missing) of tester/tiny, a private repo (an "
        "existing public one is an error):"
    ) in capsys.readouterr().out


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('[{"protocol": "knn", "dataset": "x", "value": 62}]', "accuracy 62 on x is not a fraction in \\[0, 1\\]: give 0.62"),
        ('[{"protocol": "knn", "dataset": "x", "value": -0.1}]', "not a fraction in \\[0, 1\\]: give a fraction"),
        ('[{"protocol": "knn", "dataset": "x", "value": "high"}]', "value 'high' is not a number"),
        ('[{"protocol": "knn", "value": 0.5}]', "has no \\['dataset'\\]"),
        ('[{"protocol": "knn", "dataset": "x", "value": 0.5, "top": 5}]', "unknown keys \\['top'\\]"),
        ('[{"protocol": "linear_probe", "dataset": "x", "value": 0.5, "k": 20}]', "k=20 belongs to a knn result"),
        ("{not json", "--results .*results.json is not valid JSON"),
        ('{"protocol": "knn"}', "must hold a JSON list of objects"),
    ],
)
def test_bad_results_are_refused_with_the_fix(content, message, tmp_path):
    # Silently, "value": 62 put "accuracy 62" on the card and in its model-index.
    from hf_mim.errors import UsageError
    from hf_mim.hub.cards import load_results

    (tmp_path / "results.json").write_text(content)
    with pytest.raises(UsageError, match=message):
        load_results(tmp_path / "results.json")


def test_inline_json_as_results_says_the_flag_takes_a_file():
    from hf_mim.errors import UsageError
    from hf_mim.hub.cards import load_results

    with pytest.raises(UsageError, match="--results takes the path of a JSON file, not the JSON itself"):
        load_results('[{"protocol": "knn", "dataset": "x", "value": 0.5}]')


def test_train_tokenizer_writes_the_card(tmp_path, image_folder):
    from hf_mim.training import train_tokenizer

    output_dir = tmp_path / "dvae"
    train_tokenizer.main([
        "--tokenizer_type", "dvae", "--config_overrides", "image_size=16,hidden_size=8,codebook_size=64,num_groups=3",
        "--output_dir", str(output_dir), "--train_dir", image_folder, "--do_train", "--max_steps", "2",
        "--per_device_train_batch_size", "4", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
        "--use_cpu", "--dataloader_num_workers", "0", "--disable_tqdm", "true",
    ])  # fmt: skip
    text = (output_dir / "README.md").read_text()
    assert {"hf_mim", "visual-tokenizer", "dall-e-dvae"} <= set(front_matter(text)["tags"])
    logged = [entry for entry in json.loads((output_dir / "trainer_state.json").read_text())["log_history"] if "loss" in entry]
    assert f"used {round(logged[-1]['codebook_usage'] * 64)} of them" in text
    assert "Trained for 2 optimisation steps" in text and "fine-tuned version of" not in text


# ---- through the server --------------------------------------------------------------------------

RUN_MIM_FLAGS = [
    "--model_type", "beit", "--image_size", "32", "--patch_size", "8", "--config_overrides", TINY, "--do_train",
    "--per_device_train_batch_size", "4", "--max_steps", "2", "--save_steps", "1", "--use_cpu", "--report_to", "none",
    "--dataloader_num_workers", "0", "--disable_tqdm", "true", "--push_to_hub", "--hub_model_id", "tester/x",
    "--hub_strategy", "every_save", "--hub_private_repo", "True", "--hub_revision", "dev",
]  # fmt: skip


@pytest.fixture(scope="module")
def pushed(hub, tmp_path_factory, tiny_dvae_dir, tiny_mim_dir, image_folder):
    """One client process pushes every registered family, a run_mim training run and the private/branch cases."""
    work = tmp_path_factory.mktemp("hub_client")
    kinds, jobs = {}, []
    for family in FAMILIES:
        model_type = family.model_type
        if model_type in TINY_CONFIGS:
            kinds[model_type] = save_tiny_checkpoint(family, work / model_type)
            jobs.append((model_type, [str(work / model_type), "--repo_id", f"tester/{model_type}", "--dataset", "tester/images"]))
    dvae = str(shutil.copytree(work / "hf_mim_dvae", work / "dvae"))  # pushes write their card into the folder
    jobs += [
        ("secret", [dvae, "--repo_id", "tester/secret", "--private", "--revision", "dev", "--commit_message", "draft"]),
        ("open", [dvae, "--repo_id", "tester/open"]),
        ("open-private", [dvae, "--repo_id", "tester/open", "--private"]),
        ("run_mim", [*RUN_MIM_FLAGS, "--tokenizer_name_or_path", tiny_dvae_dir, "--train_dir", image_folder,
                     "--output_dir", str(work / "run")]),
        ("finetune", ["--model_name_or_path", tiny_mim_dir, "--train_dir", image_folder, "--output_dir",
                      str(work / "finetuned"), "--do_train", "--max_steps", "1", "--per_device_train_batch_size", "4",
                      "--save_strategy", "no", "--use_cpu", "--report_to", "none", "--dataloader_num_workers", "0",
                      "--disable_tqdm", "true", "--push_to_hub", "--hub_model_id", "tester/finetuned"]),
    ]  # fmt: skip
    run([sys.executable, "-c", CLIENT, json.dumps(jobs), str(work / "errors.json")], client_env(hub, work), work,
        timeout=600, hub=hub)
    return {"work": work, "kinds": kinds, "errors": json.loads((work / "errors.json").read_text())}


@pytest.fixture(scope="module")
def loaded(hub, pushed):
    """The pushed families and the state of the Trainer run after its first save, loaded without hf_mim."""
    jobs = []
    for model_type, kind in pushed["kinds"].items():
        if model_type not in pushed["errors"]:
            readme = hub.repos[f"tester/{model_type}"].files("main")["README.md"].decode()
            jobs.append({"name": model_type, "repo_id": f"tester/{model_type}", "revision": "main", "kind": kind,
                         "snippets": python_snippets(readme)})
    first_save = first_save_commit(hub)
    if first_save is not None:
        jobs.append({"name": "first_save", "repo_id": "tester/x", "revision": first_save.oid, "kind": "mim", "snippets": []})
    return load_remotely(hub, pushed["work"] / "loaded", jobs)


def first_save_commit(hub):
    if "tester/x" not in hub.repos:
        return None
    return next((c for c in hub.repos["tester/x"].history("dev") if c.message == "Training in progress, step 1"), None)


@pytest.mark.smoke
@pytest.mark.parametrize("model_type", FAMILY_IDS)
def test_family_round_trips_through_the_hub(model_type, hub, pushed, loaded):
    if model_type not in pushed["kinds"]:
        pytest.fail(f"No tiny config for {model_type}: add a factory to TINY_CONFIGS in tests/conftest.py")
    assert model_type not in pushed["errors"], pushed["errors"][model_type]
    files = hub.repos[f"tester/{model_type}"].files("main")
    auto_map = json.loads(files["config.json"])["auto_map"]
    assert {f"{ref.rsplit('.', 1)[0]}.py" for ref in auto_map.values()} <= set(files)
    assert {"model.safetensors", "preprocessor_config.json", "README.md"} <= set(files)
    metadata = front_matter(files["README.md"].decode())
    assert {"hf_mim", "custom_code", BY_MODEL_TYPE[model_type].card_tag} <= set(metadata["tags"])
    assert metadata["datasets"] == ["tester/images"]
    assert (pushed["work"] / model_type / "README.md").read_bytes() == files["README.md"]  # the folder keeps it

    remote, kind = loaded[model_type], pushed["kinds"][model_type]
    assert "error" not in remote, remote.get("error")
    assert remote["encoder_module"].startswith("transformers_modules.") and not loaded["hf_mim_imported"]
    local = local_outputs(pushed["work"] / model_type, kind, pushed["work"] / "loaded" / model_type / "image.jpg")
    for name, value in local.items():
        assert torch.equal(value, remote[name]), name
    if kind == "mim":
        # The card's export snippet produced a stock BeitModel with the same features.
        assert torch.equal(remote["stock_hidden"], local["hidden"])


def test_private_repo_and_revision_reach_the_server(hub, pushed):
    assert not {"secret", "open"} & set(pushed["errors"]), pushed["errors"]
    secret = hub.repos["tester/secret"]
    assert secret.private and not hub.repos["tester/open"].private
    assert secret.files("main") == {}  # only the branch got the commit
    assert secret.history("dev")[-1].message == "draft" and "model.safetensors" in secret.files("dev")
    # A private push into an existing public repo is an error, not a silent public upload.
    assert "UsageError: tester/open already exists and is public" in pushed["errors"]["open-private"]
    assert "or push without --private" in pushed["errors"]["open-private"]
    assert len(hub.repos["tester/open"].history("main")) == 2


@pytest.mark.smoke
def test_trainer_every_save_pushes_are_loadable(hub, pushed, loaded):
    assert "run_mim" not in pushed["errors"], pushed["errors"]["run_mim"]
    repo, output_dir = hub.repos["tester/x"], pushed["work"] / "run"
    assert repo.private and repo.files("main") == {}  # --hub_private_repo, --hub_revision dev
    first_save = first_save_commit(hub)
    auto_map = json.loads(first_save.files["config.json"])["auto_map"]
    code_files = {f"{ref.rsplit('.', 1)[0]}.py" for ref in auto_map.values()}
    assert code_files <= set(first_save.files), sorted(first_save.files)
    assert {"tokenizer/preprocessor_config.json", "image_processing_dvae.py", "README.md"} <= set(first_save.files)

    # The model as it was after its first save loads from the server without hf_mim and is checkpoint-1.
    remote = loaded["first_save"]
    assert "error" not in remote, remote.get("error")
    image = pushed["work"] / "loaded" / "first_save" / "image.jpg"
    local = local_outputs(output_dir / "checkpoint-1", "mim", image, output_dir)
    assert torch.equal(remote["hidden"], local["hidden"]) and torch.equal(remote["targets"], local["targets"])
    final_weights = load_file(output_dir / "model.safetensors")["lm_head.weight"]
    assert not torch.equal(load_file(output_dir / "checkpoint-1" / "model.safetensors")["lm_head.weight"], final_weights)

    text = repo.files("dev")["README.md"].decode()
    assert {"hf_mim", "custom_code", "beit"} <= set(front_matter(text)["tags"])
    assert "fine-tuned version of" not in text and "Trained for 2 optimisation steps" in text
    assert '"tester/x"' in text


def test_a_fine_tuned_classifier_pushes_as_the_stock_transformers_model_it_is(hub, pushed):
    # The push used to copy transformers' own modeling file into the output folder, fail on its relative imports,
    # and leave an empty repo; then hf_mim's card had no template for a stock "beit".
    assert "finetune" not in pushed["errors"], pushed["errors"]["finetune"]
    files = hub.repos["tester/finetuned"].files("main")
    config = json.loads(files["config.json"])
    assert config["architectures"] == ["BeitForImageClassification"] and "auto_map" not in config
    assert "model.safetensors" in files and not [name for name in files if name.endswith(".py")]
    assert not list((pushed["work"] / "finetuned").glob("*.py"))
    # transformers' own card of a fine-tuned model, not an hf_mim pre-training card.
    tags = front_matter(files["README.md"].decode())["tags"]
    assert "generated_from_trainer" in tags and "hf_mim" not in tags


def test_a_knn_result_keeps_its_k_through_the_model_index(tmp_path):
    from hf_mim.hub.cards import load_results

    (tmp_path / "results.json").write_text('[{"protocol": "knn", "dataset": "x", "value": 0.5, "k": 20}]')
    (result,) = load_results(tmp_path / "results.json")
    again = CardResult.from_eval_result(result.to_eval_result())
    assert again == result and again.label == "k-NN (frozen features), k = 20"


def assert_one_line_exit(completed, fragment):
    errors = [line for line in completed.stderr.splitlines() if line.startswith("error: ")]
    assert completed.returncode == 2 and len(errors) == 1 and fragment in errors[0], completed.stderr[-3000:]
    assert "Traceback" not in completed.stderr


@pytest.mark.parametrize(
    "env_change, fragment",
    [
        ({"HF_TOKEN": "hf_wrong"}, "the Hub refused the token for tester/denied (401 Unauthorized): log in with "
         "`hf auth login`, set HF_TOKEN or pass --token with a write token"),
        ({"HF_ENDPOINT": "http://127.0.0.1:9"}, "cannot reach the Hub at http://127.0.0.1:9 to push tester/denied"),
    ],
    ids=["wrong token", "unreachable"],
)
def test_a_push_the_hub_refuses_or_cannot_reach_is_one_line(hub, tmp_path, env_change, fragment):
    folder = tmp_path / "dvae"
    save_tiny_checkpoint(BY_MODEL_TYPE["hf_mim_dvae"], folder)
    env = {**client_env(hub, tmp_path), **env_change}
    command = [sys.executable, str(REPO / "scripts" / "push_to_hub.py"), str(folder), "--repo_id", "tester/denied"]
    assert_one_line_exit(subprocess.run(command, capture_output=True, text=True, env=env, timeout=300), fragment)
    assert "tester/denied" not in hub.repos


def test_a_training_run_whose_token_the_hub_refuses_stops_before_training(hub, tmp_path, tiny_dvae_dir, image_folder):
    flags = [*RUN_MIM_FLAGS, "--tokenizer_name_or_path", tiny_dvae_dir, "--train_dir", image_folder, "--output_dir",
             str(tmp_path / "run"), "--hub_model_id", "tester/denied", "--hub_token", "hf_wrong"]  # fmt: skip
    command = [sys.executable, str(REPO / "scripts" / "run_mim.py"), *map(str, flags)]
    completed = subprocess.run(command, capture_output=True, text=True, env=client_env(hub, tmp_path), timeout=300)
    assert_one_line_exit(completed, "the Hub refused the token for tester/denied (401 Unauthorized)")
    assert "pass --hub_token with a write token" in completed.stderr
    assert not (tmp_path / "run" / "model.safetensors").exists() and "tester/denied" not in hub.repos


def test_hub_refusals_and_connection_failures_are_one_line_and_other_failures_keep_their_traceback():
    from types import SimpleNamespace

    from huggingface_hub.errors import HfHubHTTPError

    from hf_mim.errors import UsageError
    from hf_mim.hub.push import hub_request_errors

    def refused(status):
        return HfHubHTTPError(f"{status}", response=SimpleNamespace(status_code=status, headers={}, request=None))

    ConnectTimeout = type("ConnectTimeout", (Exception,), {})  # the name huggingface_hub's HTTP client gives it
    ReadTimeout = type("ReadTimeout", (Exception,), {})
    for error, message in [
        (refused(401), re.escape("the Hub refused the token for me/x (401 Unauthorized): log in with `hf auth login`")),
        (refused(403), re.escape("the token may not write to me/x (403 Forbidden): pass --hub_token with write access")),
        (ConnectTimeout("no route"), "cannot reach the Hub at .* to push me/x \\(no route\\)"),
        (ConnectionError("offline"), "cannot reach the Hub at .* to push me/x \\(offline\\)"),
    ]:
        with pytest.raises(UsageError, match=message), hub_request_errors("me/x", token_flag="--hub_token"):
            raise error
    # A server failure or a timeout mid-upload is not the user's to fix.
    for error in (refused(500), ReadTimeout("slow")):
        with pytest.raises(type(error)), hub_request_errors("me/x"):
            raise error


def test_a_dataset_id_named_like_a_local_folder_is_still_a_hub_id(tmp_path, monkeypatch):
    # "cifar10" is a Hub id wherever a ./cifar10 folder happens to lie; "runs/dvae" is a path only where it exists.
    folder = tmp_path / "ckpt"
    save_tiny_checkpoint(BY_MODEL_TYPE["hf_mim_dvae"], folder)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cifar10").mkdir()
    (tmp_path / "runs" / "dvae").mkdir(parents=True)
    push_main([str(folder), "--repo_id", "tester/tiny", "--dry_run", str(tmp_path / "upload"), "--dataset", "cifar10"])
    assert front_matter((tmp_path / "upload" / "README.md").read_text())["datasets"] == ["cifar10"]
    with pytest.raises(ValueError, match="--base_model runs/dvae is a local path"):
        push_main([str(folder), "--repo_id", "tester/tiny", "--dry_run", str(tmp_path / "u2"), "--base_model",
                   "runs/dvae"])  # fmt: skip
