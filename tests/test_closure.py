"""A saved checkpoint carries only its own family's code, its tokenizer family's and the shared helpers, and loads
with `trust_remote_code=True` where hf_mim cannot be imported.

Each family is saved twice over: `save_pretrained` of the model (the checkpoint), then with what a run_mim.py output
adds and `hf-mim push` uploads (the root image processor, the tokenizer's view under `tokenizer/`, and that view's
code also at the root, `complete_code_files`). The number of code files and lines of both is printed (`pytest -s`)
and bounded. At f10a5aa, before the closure was narrowed, BEiT + dVAE saved 14 files (2,297 lines) and CCViT 18.
"""

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import BLOCK_HF_MIM
from fixtures.make_checkpoints import BACKBONE, SIZE, mim_expected, mim_models, tokenizer_expected, tokenizers
from safetensors.torch import save_file
from test_old_checkpoints import assert_loaded_as_recorded, run_loader

from transformers import CLIPVisionConfig, TrainerState, TrainingArguments
from transformers.utils import hub as transformers_hub

from hf_mim import (
    BeitMimConfig,
    BeitMimForMaskedImageModeling,
    FeatureKmeansConfig,
    FeatureKmeansImageProcessor,
    FeatureKmeansModel,
    MimImageProcessor,
    MimTokenizerPreTrainedModel,
)
from hf_mim.checkpoint_folder import complete_code_files
from hf_mim.families import FAMILIES, MIM_METHODS, TOKENIZERS, closure_blocks, write_closure_blocks
from hf_mim.hub.callbacks import HubFilesCallback
from hf_mim.models import configuration_beit, modeling_beit
from hf_mim.models.configuration_beit import FAMILY_BLOCK_FILES

MODELS_DIR = Path(__file__).resolve().parents[1] / "src" / "hf_mim" / "models"
# name -> (files, lines) at most: of the saved model, and of the upload. Measured, with room for a few lines.
BOUNDS = {
    "dvae": ((4, 550), (6, 700)),
    # VQ-KD's codebook_update_weight (a stand-in example's zero weight in the EMA statistics) added 14 lines;
    # configuration_transformer.py (checks of the activation, LayerNorm epsilon and init std) a file.
    "vqkd": ((7, 1060), (9, 1210)),
    "vqgan": ((4, 500), (6, 630)),
    # The nearest-centroid search is centroids.py, shared with feature k-means.
    "kmeans": ((5, 570), (7, 700)),
    # beit_backbone.py keeps a BEiT teacher's position index on the device.
    "feature_kmeans": ((7, 850), (9, 980)),
    # The MIM families' configs check their transformer sizes and settings (configuration_transformer.py).
    "beit": ((5, 765), (6, 875)),
    "beit_dvae": ((8, 1265), (10, 1405)),
    "beitv2_vqkd": ((11, 1815), (13, 1965)),
    "mcbeit_dvae": ((10, 1545), (12, 1695)),
    "mcbeit_vqgan": ((10, 1495), (12, 1625)),
    "ccvit_kmeans": ((13, 1815), (15, 1945)),
    "beit_feature_kmeans": ((10, 1400), (12, 1530)),
}
CODE_PREFIXES = ("configuration_", "modeling_", "image_processing_")


def families(file_name: str) -> set[str]:
    """The families whose code `file_name` is (none for a shared helper such as configuration_common.py or
    beit_backbone.py, the ViT that MIM models and VQ-KD share). By prefix: family names hold underscores."""
    stem = Path(file_name).stem
    owner = next((stem[len(prefix) :] for prefix in CODE_PREFIXES if stem.startswith(prefix)), None)
    return {owner} & {family.name for family in FAMILIES}


def case_families(name: str) -> set[str]:
    """The families of a case `name`: "<mim family>_<tokenizer family>", a MIM family, or a tokenizer family."""
    mim = next((method for method in MIM_METHODS if name == method or name.startswith(f"{method}_")), None)
    return {name} if mim is None else {mim, name[len(mim) + 1 :]} - {""}


def allowed_families(name: str) -> set[str]:
    """A checkpoint `name` may carry these families."""
    parts = case_families(name)
    # A method's config extends those of the methods it builds on (every one BEiT's, CCViT BEiT v2's).
    extended = {
        other.name for part in parts & set(MIM_METHODS) for other in MIM_METHODS.values()
        if issubclass(MIM_METHODS[part].config_class, other.config_class)
    }  # fmt: skip
    return parts | extended


def count(folder: Path) -> tuple[int, int]:
    files = sorted(folder.glob("*.py"))
    return len(files), sum(len(path.read_text().splitlines()) for path in files)


def cases() -> dict:
    """name -> (model, image processor of the root, image processor of the tokenizer view or None)."""
    tokenizer_of = tokenizers()
    processor = MimImageProcessor(size={"height": SIZE, "width": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    found = {name: (model.eval(), own_processor, None) for name, (model, own_processor) in tokenizer_of.items()}
    for name, (model, family) in mim_models(tokenizer_of).items():
        if not name.endswith("_with_decoder"):
            found[name] = (model, processor, tokenizer_of[family][1])
    torch.manual_seed(0)
    found["beit"] = (BeitMimForMaskedImageModeling(BeitMimConfig(**BACKBONE)).eval(), processor, None)
    return {**found, **feature_kmeans_cases(processor)}


def feature_kmeans_cases(processor) -> dict:
    """The feature k-means tokenizer (a tiny CLIP vision teacher inside) and BEiT pre-trained with it, as `cases` holds
    them. CLIP's weights keep their names on disk (ViT's are renamed on load), so the loader's key check applies."""
    torch.manual_seed(0)
    teacher = CLIPVisionConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                               image_size=SIZE, patch_size=4)  # fmt: skip
    tokenizer = FeatureKmeansModel(
        FeatureKmeansConfig(image_size=SIZE, patch_size=4, codebook_size=BACKBONE["vocab_size"], feature_dim=16,
                            teacher_config=teacher.to_dict(), teacher_class="CLIPVisionModel")
    ).eval()  # fmt: skip
    tokenizer.set_centroids(torch.randn(BACKBONE["vocab_size"], 16))
    view = FeatureKmeansImageProcessor(size={"height": SIZE, "width": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    torch.manual_seed(1)
    model = BeitMimForMaskedImageModeling(BeitMimConfig(**BACKBONE, tokenizer_config=tokenizer.config.to_dict()))
    with torch.no_grad():
        for key, parameter in model.named_parameters():
            if not key.startswith("tokenizer."):
                parameter.add_(0.02 * torch.randn_like(parameter))
    model.set_tokenizer(tokenizer)
    return {"feature_kmeans": (tokenizer, view, None), "beit_feature_kmeans": (model.eval(), processor, view)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (counts of the saved model, counts of the upload, code file names); then every upload folder loaded
    in one process without hf_mim: (report, outputs folder, root)."""
    base = tmp_path_factory.mktemp("closure")
    root = base / "checkpoints"
    measured = {}
    for name, (model, processor, tokenizer_processor) in cases().items():
        folder = root / name
        model.save_pretrained(folder)
        saved_counts = count(folder)
        processor.save_pretrained(folder)
        if tokenizer_processor is not None:
            tokenizer_processor.save_pretrained(folder / "tokenizer")
        complete_code_files(folder)
        expected = tokenizer_expected(model) if isinstance(model, MimTokenizerPreTrainedModel) else mim_expected(model)
        save_file({key: value.contiguous() for key, value in expected.items()}, folder / "expected.safetensors")
        measured[name] = (saved_counts, count(folder), sorted(path.name for path in folder.glob("*.py")))
        print(f"{name}: saved model {saved_counts[0]} files, {saved_counts[1]} lines; "
              f"upload {measured[name][1][0]} files, {measured[name][1][1]} lines: {measured[name][2]}")
    return measured, run_loader("remote", root, base / "outputs"), base / "outputs", root


def test_cases_cover_every_family():
    assert set(BOUNDS) == set(cases())
    assert {family for name in BOUNDS for family in case_families(name)} == {family.name for family in FAMILIES}


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_checkpoint_carries_only_its_families_code_and_loads_without_hf_mim(saved, name):
    measured, report, outputs, root = saved
    saved_counts, upload_counts, files = measured[name]
    for counts, bound in zip((saved_counts, upload_counts), BOUNDS[name]):
        assert counts[0] <= bound[0] and counts[1] <= bound[1], f"{name}: {counts} (files, lines) over {bound}"
    strangers = {file: families(file) - allowed_families(name) for file in files}
    assert not any(strangers.values()), f"{name} carries other families' code: {strangers}"
    assert_loaded_as_recorded("remote", report, name, root / name / "expected.safetensors", outputs)


def test_beit_with_dvae_saves_at_most_eight_code_files(saved):
    measured = saved[0]
    assert measured["beit_dvae"][0][0] <= 8


def test_no_configuration_file_imports_a_modeling_file():
    for path in MODELS_DIR.glob("configuration_*.py"):
        imported = re.findall(r"^\s*from\s+\.(\S+)\s+import", path.read_text(), flags=re.MULTILINE)
        assert not [module for module in imported if not module.startswith("configuration_")], path.name


def test_source_family_blocks_are_the_registrys_rendering(tmp_path):
    """hf_mim's own copies of the family blocks list every tokenizer of `hf_mim.families.TOKENIZERS`, exactly as
    `python -m hf_mim.families` writes them (a checkpoint's copy is the same block narrowed to its family)."""
    for file_name in FAMILY_BLOCK_FILES:
        (tmp_path / file_name).write_text((MODELS_DIR / file_name).read_text())
    assert write_closure_blocks(tmp_path) == [], "the closure's family blocks differ: run `python -m hf_mim.families`"
    modules = {"configuration_beit.py": configuration_beit, "modeling_beit.py": modeling_beit}
    for file_name, (tuple_name, auto_class) in FAMILY_BLOCK_FILES.items():
        classes = getattr(modules[file_name], tuple_name)
        config_classes = [getattr(cls, "config_class", cls) for cls in classes]
        assert {config_class.model_type for config_class in config_classes} == {
            tokenizer.model_type for tokenizer in TOKENIZERS.values()
        }
        # The checkpoint's rewrite names each class by its tokenizer config's auto_map entry: the same classes.
        assert sorted(config_class().auto_map[auto_class] for config_class in config_classes) == closure_blocks()[file_name]


def test_a_new_tokenizer_in_the_registry_is_rendered_into_both_blocks(tmp_path, monkeypatch):
    for file_name in FAMILY_BLOCK_FILES:
        (tmp_path / file_name).write_text((MODELS_DIR / file_name).read_text())
    # Only where the classes live matters to the blocks.
    new = dataclasses.replace(
        TOKENIZERS["kmeans"],
        name="other",
        config_class=type("OtherConfig", (), {"__module__": "hf_mim.models.configuration_other"}),
        model_class=type("OtherModel", (), {"__module__": "hf_mim.models.modeling_other"}),
    )
    monkeypatch.setitem(TOKENIZERS, "other", new)
    assert sorted(write_closure_blocks(tmp_path)) == sorted(FAMILY_BLOCK_FILES)
    configuration, modeling = (tmp_path / "configuration_beit.py").read_text(), (tmp_path / "modeling_beit.py").read_text()
    assert "from .configuration_other import OtherConfig\n" in configuration and ", OtherConfig," in configuration
    assert "from .modeling_other import OtherModel\n" in modeling and ", OtherModel," in modeling


def test_saving_again_without_hf_mim_keeps_the_narrow_code(saved, tmp_path):
    """A checkpoint loaded where hf_mim is not installed and saved again carries the same files."""
    root = saved[3]
    script = BLOCK_HF_MIM + (
        "from transformers import AutoModelForMaskedImageModeling\n"
        "model = AutoModelForMaskedImageModeling.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "model.save_pretrained(sys.argv[2])\n"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(
        [sys.executable, "-c", script, str(root / "beit_dvae"), str(tmp_path / "again")], capture_output=True,
        text=True, env=env, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    first = {path.name: path.read_text() for path in root.joinpath("beit_dvae").glob("*.py")}
    again = {path.name: path.read_text() for path in (tmp_path / "again").glob("*.py")}
    # The upload also holds the image processors' code, which the model's save does not write.
    assert again == {name: text for name, text in first.items() if not name.startswith("image_processing_")}


def beit_dvae():
    return mim_models(tokenizers())["beit_dvae"][0]


def test_trainer_push_callback_writes_only_the_checkpoints_code(tmp_path):
    """What Trainer's intermediate pushes upload: the code files written at the start of training."""
    args = TrainingArguments(output_dir=str(tmp_path), push_to_hub=True, hub_model_id="tester/x", report_to="none")
    HubFilesCallback().on_train_begin(args, TrainerState(), None, model=beit_dvae())
    assert sorted(path.name for path in tmp_path.glob("*.py")) == [
        "beit_backbone.py", "configuration_beit.py", "configuration_common.py", "configuration_dvae.py",
        "configuration_transformer.py", "modeling_beit.py", "modeling_dvae.py", "modeling_tokenizer.py",
    ]


def test_config_pushed_from_save_pretrained_uploads_only_its_code(tmp_path, monkeypatch):
    uploaded = []
    monkeypatch.setattr(transformers_hub, "hf_api", lambda: SimpleNamespace(
        create_repo=lambda repo_id, **kwargs: SimpleNamespace(repo_id=repo_id)
    ))
    monkeypatch.setattr(transformers_hub, "create_and_tag_model_card", lambda *args, **kwargs: SimpleNamespace(
        save=lambda path: None
    ))

    def upload(self, folder, *args, **kwargs):
        uploaded.append(sorted(path.name for path in Path(folder).glob("*.py")))

    monkeypatch.setattr(transformers_hub.PushToHubMixin, "_upload_modified_files", upload)
    beit_dvae().config.save_pretrained(tmp_path / "local", push_to_hub=True, repo_id="tester/x")
    narrow = ["configuration_beit.py", "configuration_common.py", "configuration_dvae.py", "configuration_transformer.py"]
    assert uploaded == [narrow] and sorted(path.name for path in (tmp_path / "local").glob("*.py")) == narrow
