"""The layout of a checkpoint folder (`hf_mim.checkpoint_folder`): the tokenizer view of a MIM checkpoint."""

from hf_mim import DvaeImageProcessor, MimImageProcessor
from hf_mim.checkpoint_folder import (
    TOKENIZER_SUBFOLDER,
    has_tokenizer_image_processor,
    load_tokenizer_image_processor,
    save_tokenizer_image_processor,
)

COMMIT = "0" * 40


def test_tokenizer_view_round_trips_through_its_subfolder(tmp_path):
    view = DvaeImageProcessor(size={"height": 16, "width": 16}, crop_size={"height": 16, "width": 16})
    MimImageProcessor().save_pretrained(tmp_path)
    assert not has_tokenizer_image_processor(tmp_path)
    save_tokenizer_image_processor(tmp_path, view)
    assert has_tokenizer_image_processor(tmp_path) and (tmp_path / TOKENIZER_SUBFOLDER).is_dir()
    assert load_tokenizer_image_processor(str(tmp_path)).to_dict() == view.to_dict()


def test_tokenizer_view_of_a_hub_checkpoint_is_its_repos_subfolder(tmp_path):
    """A checkpoint named by Hub id: its view is the repo's `tokenizer/` folder, not a local path 'owner/name/tokenizer'
    (what `hf-mim pretrain --model_name_or_path owner/name` and `hf-mim visualize` looked for)."""
    repo = tmp_path / "cache" / "models--tester--beit"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    MimImageProcessor().save_pretrained(snapshot)
    view = DvaeImageProcessor(size={"height": 16, "width": 16}, crop_size={"height": 16, "width": 16})
    save_tokenizer_image_processor(snapshot, view)
    loaded = load_tokenizer_image_processor("tester/beit", cache_dir=str(tmp_path / "cache"), local_files_only=True)
    assert type(loaded) is DvaeImageProcessor and loaded.to_dict() == view.to_dict()
