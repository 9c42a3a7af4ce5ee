"""The dataset options every script shares (one dataclass, one loader) and train_tokenizer's config overrides."""

import dataclasses

import pytest
from datasets import IterableDataset
from transformers import HfArgumentParser

from hf_mim.data import (
    ImageDatasetArguments,
    LabelledImageDatasetArguments,
    RenderingArguments,
    StreamingImageDatasetArguments,
    load_image_datasets_from_args,
)
from hf_mim.evaluation.features import FeatureArguments
from hf_mim.training import pretraining, run_image_classification, tokenizer_training, train_tokenizer

SHARED_FLAGS = [
    "--dataset_name", "imagefolder", "--dataset_config_name", "default", "--train_dir", "train",
    "--validation_dir", "val", "--train_val_split", "0.1", "--image_column_name", "img",
    "--max_train_samples", "7", "--max_eval_samples", "3",
]  # fmt: skip
SHARED_VALUES = {
    "dataset_name": "imagefolder", "dataset_config_name": "default", "train_dir": "train", "validation_dir": "val",
    "train_val_split": 0.1, "image_column_name": "img", "max_train_samples": 7, "max_eval_samples": 3,
}  # fmt: skip

# The defaults of run_mim, train_tokenizer, run_image_classification and the feature scripts when each declared its own
# dataset options (commit 379cb2d).
PRE_REFACTOR_DEFAULTS = {
    "dataset_name": None, "dataset_config_name": None, "train_dir": None, "validation_dir": None,
    "train_val_split": 0.0, "image_column_name": None, "max_train_samples": None, "max_eval_samples": None,
    "label_column_name": "label", "streaming": False,
}  # fmt: skip

# Each script's argument dataclasses (without TrainingArguments), their dataset options, and flags it needs besides.
SCRIPTS = {
    "run_mim": ((pretraining.ModelArguments, pretraining.DataArguments), 1, StreamingImageDatasetArguments, []),
    "train_tokenizer": (
        (tokenizer_training.TokenizerArguments, tokenizer_training.DataArguments), 1, StreamingImageDatasetArguments, []
    ),
    "run_image_classification": (
        (run_image_classification.ModelArguments, run_image_classification.DataArguments),
        1,
        LabelledImageDatasetArguments,
        ["--model_name_or_path", "m"],
    ),
    "features": ((FeatureArguments,), 0, LabelledImageDatasetArguments, ["--model_name_or_path", "m"]),
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_parses_the_shared_dataset_flags_into_the_shared_dataclass(script):
    classes, data_index, base, required = SCRIPTS[script]
    data_args = HfArgumentParser(classes).parse_args_into_dataclasses(args=[*SHARED_FLAGS, *required])[data_index]
    assert isinstance(data_args, base)
    assert {name: getattr(data_args, name) for name in SHARED_VALUES} == SHARED_VALUES
    # Defaults too, the values every script had before they shared one dataclass.
    defaults = HfArgumentParser(classes).parse_args_into_dataclasses(args=required)[data_index]
    expected = {f.name: PRE_REFACTOR_DEFAULTS[f.name] for f in dataclasses.fields(base)}
    assert {name: getattr(defaults, name) for name in expected} == expected


def test_streaming_is_a_flag_only_of_scripts_that_can_stream():
    streaming = {
        name for name, (classes, index, _, _) in SCRIPTS.items() if "streaming" in classes[index].__dataclass_fields__
    }
    assert streaming == {"run_mim", "train_tokenizer"}


@pytest.mark.parametrize("name", ["max_train_samples", "max_eval_samples"])
def test_the_truncation_help_says_what_streaming_keeps(name):
    help_text = StreamingImageDatasetArguments.__dataclass_fields__[name].metadata["help"]
    assert "a seeded random subset" in help_text and "with --streaming, the first" in help_text


def test_the_loader_follows_the_arguments(image_folder):
    raw, column = load_image_datasets_from_args(
        ImageDatasetArguments(train_dir=image_folder, train_val_split=0.25, max_eval_samples=2), seed=0
    )
    assert column == "image" and len(raw["train"]) == 18 and len(raw["validation"]) == 2
    streaming = StreamingImageDatasetArguments(train_dir=image_folder, streaming=True)
    raw, _ = load_image_datasets_from_args(streaming, seed=0)
    assert isinstance(raw["train"], IterableDataset)


def test_a_missing_validation_split_fails_before_any_work(image_folder):
    with pytest.raises(ValueError, match="Evaluation needs a validation split.*--train_val_split"):
        load_image_datasets_from_args(ImageDatasetArguments(train_dir=image_folder), seed=0, evaluate=True)


def test_train_tokenizer_checks_the_validation_split_before_a_kmeans_fit(image_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(
        "hf_mim.training.kmeans.train_kmeans_tokenizer", lambda *args: pytest.fail("fitted before the check")
    )
    with pytest.raises(ValueError, match="Evaluation needs a validation split"):
        train_tokenizer.main(["--tokenizer_type", "kmeans", "--train_dir", image_folder, "--output_dir", str(tmp_path),
                              "--do_train", "--do_eval", "--use_cpu", "--report_to", "none"])  # fmt: skip


def test_an_image_size_override_of_a_saved_tokenizer_changes_its_view_too(tiny_dvae_dir):
    # The saved processor makes 16 px views; the overridden config reads 32 px.
    args = tokenizer_training.TokenizerArguments(tokenizer_name_or_path=tiny_dvae_dir, config_overrides="image_size=32")
    model, image_processor = tokenizer_training.load_tokenizer(args)
    assert model.config.image_size == 32 and image_processor.output_size == (32, 32)


def test_an_override_given_twice_is_a_clear_error(tiny_dvae_dir):
    args = tokenizer_training.TokenizerArguments(
        tokenizer_name_or_path=tiny_dvae_dir, config_overrides="image_size=32,image_size=64"
    )
    with pytest.raises(ValueError, match="sets image_size more than once in 'image_size=32,image_size=64'"):
        tokenizer_training.load_tokenizer(args)


def test_an_override_that_reshapes_a_saved_tokenizer_is_a_clear_error(tiny_dvae_dir):
    args = tokenizer_training.TokenizerArguments(tokenizer_name_or_path=tiny_dvae_dir, config_overrides="codebook_size=32")
    with pytest.raises(ValueError, match="codebook_size=32 changes the weights of the saved tokenizer.*64.*-> .*32"):
        tokenizer_training.load_tokenizer(args)


class _Built(Exception):
    """Raised by a recording `TwoViewTransform` once the training view is built: the run stops there."""


# The colour jitter of each command's recipe when --color_jitter is not given (BEiT pre-training; a dVAE; fine-tuning
# under its default RandAugment, as in timm).
DEFAULT_COLOR_JITTER = {"run_mim": 0.4, "train_tokenizer": 0.0, "run_image_classification": 0.0}


@pytest.mark.parametrize("given", [False, True])
@pytest.mark.parametrize("script", ["run_mim", "train_tokenizer", "run_image_classification"])
def test_rendering_flags_reach_every_training_view(script, given, tiny_dvae_dir, tiny_mim_dir, image_folder, tmp_path,
                                                   monkeypatch):
    from hf_mim.training import run_mim

    module, entry, flags = {
        "run_mim": (pretraining, run_mim.main, ["--model_type", "beit", "--tokenizer_name_or_path", tiny_dvae_dir,
                                                "--image_size", "32", "--patch_size", "8"]),
        "train_tokenizer": (tokenizer_training, train_tokenizer.main, ["--tokenizer_type", "dvae"]),
        "run_image_classification": (run_image_classification, run_image_classification.main,
                                     ["--model_name_or_path", tiny_mim_dir]),
    }[script]
    built = []

    def recording(*args, **kwargs):
        if kwargs.get("train", True):
            built.append(kwargs)
            raise _Built
        return module.TwoViewTransform.__wrapped__(*args, **kwargs)

    recording.__wrapped__ = module.TwoViewTransform
    monkeypatch.setattr(module, "TwoViewTransform", recording)
    rendering = ["--exact_augmentation", "--crop_min_scale", "0.3", "--color_jitter", "0.2"] if given else []
    with pytest.raises(_Built):
        entry([*flags, "--train_dir", image_folder, "--output_dir", str(tmp_path), "--do_train", "--use_cpu",
               "--report_to", "none", *rendering])  # fmt: skip
    expected = (True, (0.3, 1.0), 0.2) if given else (False, (0.08, 1.0), DEFAULT_COLOR_JITTER[script])
    assert (built[-1]["exact"], built[-1]["crop_scale"], built[-1]["color_jitter"]) == expected


def test_rendering_flags_are_declared_once():
    # One declaration (RenderingArguments) serves every training command, so help and defaults cannot drift apart.
    declared = {field.name: field for field in dataclasses.fields(RenderingArguments)}
    for arguments in (pretraining.DataArguments, tokenizer_training.DataArguments, run_image_classification.DataArguments):
        for name in ("crop_min_scale", "color_jitter", "exact_augmentation"):
            assert arguments.__dataclass_fields__[name] is declared[name], (arguments, name)
    with pytest.raises(ValueError, match="color_jitter"):
        RenderingArguments().view_options()


def test_flags_set_compares_list_flags_with_their_factory_default():
    from hf_mim.arguments import flags_set

    @dataclasses.dataclass
    class Flags:
        ks: list[int] = dataclasses.field(default_factory=lambda: [10, 20])
        rate: float = 0.5

    assert flags_set(Flags(), ["ks", "rate"]) == []
    assert flags_set(Flags(ks=[5], rate=0.1), ["ks", "rate"]) == ["ks", "rate"]


def test_schedule_flags_are_refused_only_where_nothing_reads_them(tmp_path):
    from hf_mim.errors import UsageError
    from hf_mim.training.arguments import MimTrainingArguments

    def arguments(**flags):
        return MimTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **flags)

    # TrainingArguments fills in the loss as the metric of --load_best_model_at_end, and evaluates every
    # --logging_steps under --eval_strategy steps without --eval_steps: both flags are read there.
    best = {"eval_strategy": "steps", "eval_steps": 10, "save_steps": 10, "load_best_model_at_end": True}
    assert arguments(**best, greater_is_better=False).greater_is_better is False
    assert arguments(eval_strategy="steps", logging_strategy="epoch", logging_steps=100).eval_steps == 100
    with pytest.raises(UsageError, match=r"--greater_is_better True with the loss \(the default metric\): a lower loss"):
        arguments(**best, greater_is_better=True)
    with pytest.raises(UsageError, match="--logging_steps 100 takes effect with --logging_strategy steps, but"):
        arguments(logging_strategy="epoch", logging_steps=100)


def test_a_folder_on_a_drive_that_does_not_exist_is_one_line(monkeypatch):
    # On Windows a missing drive's root is its own parent: looking for an existing parent never ended.
    from hf_mim.errors import UsageError
    from hf_mim.training import loading

    monkeypatch.setattr(loading.os.path, "exists", lambda path: False)
    with pytest.raises(UsageError, match="--output_dir /q/runs: / does not exist; pass a folder on a drive"):
        loading.require_folder_path("output_dir", "/q/runs")


def test_only_a_repo_not_found_or_an_unreachable_hub_is_said_to_be_neither_folder_nor_hub_id():
    # A Hub repo that was found but cannot be used (gated, remote code) is no missing folder.
    from huggingface_hub.errors import RepositoryNotFoundError

    from hf_mim.errors import UsageError
    from hf_mim.training.loading import pretrained

    def gated(name):
        raise OSError("You are trying to access a gated repo.")

    def missing(name):
        # Built without an HTTP response, which this one would need.
        not_found = RepositoryNotFoundError.__new__(RepositoryNotFoundError)
        Exception.__init__(not_found, "404 Client Error")
        raise OSError(f"{name} is not a valid model identifier") from not_found

    with pytest.raises(UsageError, match=r"--model_name_or_path someone/gated could not be loaded: You are trying"):
        pretrained(gated, "someone/gated", "model_name_or_path")
    with pytest.raises(UsageError, match=r"--model_name_or_path runs/beit: no such folder here, and as a Hub id"):
        pretrained(missing, "runs/beit", "model_name_or_path")
