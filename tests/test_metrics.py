"""hf_mim's evaluate modules load offline by path (conftest sets HF_HUB_OFFLINE) and compute the right numbers;
wheels ship them. Every tokenizer trainer logs codebook usage under the same names and definition."""

import pathlib
import tomllib

import evaluate
import pytest
import torch
from conftest import tiny_dvae_config
from transformers import TrainingArguments, ViTConfig, ViTModel

from hf_mim import VqkdConfig, VqkdModel
from hf_mim.data import MimDataCollator
from hf_mim.evaluation.codebook import codebook_metrics
from hf_mim.evaluation.metrics import METRIC_NAMES, METRICS_DIR, load_metric, metric_path
from hf_mim.models import DvaeModel
from hf_mim.training.dvae import DvaeTrainer
from hf_mim.training.vqkd import VqkdTeacher, VqkdTrainer

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_accuracy():
    metric = evaluate.load(metric_path("accuracy"))
    assert metric.compute(predictions=[0, 1, 1, 2], references=[0, 1, 0, 0]) == {"accuracy": 0.5}
    assert metric.compute(predictions=[0, 1], references=[0, 0], sample_weight=[3, 1]) == {"accuracy": 0.75}


def test_masked_accuracy_scores_masked_patches_only():
    metric = load_metric("masked_accuracy")
    metric.add_batch(predictions=[[1, 2, 3, 4]], references=[[1, 0, 3, 0]], bool_masked_pos=[[True, True, False, False]])
    metric.add_batch(predictions=[[5, 5, 5, 5]], references=[[5, 5, 0, 0]], bool_masked_pos=[[False, False, True, True]])
    assert metric.compute() == {"masked_accuracy": 0.25, "num_masked": 4}
    with pytest.raises(ValueError, match="one entry per patch"):
        metric.compute(predictions=[[1, 2]], references=[[1, 2]], bool_masked_pos=[[True]])


def test_codebook_usage():
    measurement = load_metric("codebook_usage")
    result = measurement.compute(token_ids=[0, 1, 2, 3] * 5, codebook_size=8)
    assert result == {"num_used_codes": 4, "codebook_usage": 0.5, "codebook_perplexity": pytest.approx(4.0)}
    assert measurement.compute(token_ids=[7] * 10, codebook_size=8)["codebook_perplexity"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="codebook_size"):
        measurement.compute(token_ids=[0, 1])
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        measurement.compute(token_ids=[8], codebook_size=8)
    with pytest.raises(ValueError, match="ships"):
        metric_path("bleu")


def test_package_data_ships_every_module():
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["hf_mim.evaluation.metrics"]
    shipped = {path for pattern in patterns for path in pathlib.Path(METRICS_DIR).glob(pattern)}
    assert {pathlib.Path(METRICS_DIR, name, f"{name}.py") for name in METRIC_NAMES} <= shipped
    assert len(list(pathlib.Path(METRICS_DIR).glob("*/*.py"))) == len(METRIC_NAMES)


def test_codebook_metrics_of_hand_built_token_ids():
    def of(token_ids, codebook_size):
        return codebook_metrics(torch.bincount(torch.tensor(token_ids), minlength=codebook_size))

    # Usage is a fraction of the codebook; perplexity counts equally used codes.
    assert of([0, 1, 2, 3] * 3, 16) == {"codebook_usage": 0.25, "codebook_perplexity": pytest.approx(4.0)}
    assert of([5] * 9, 16) == {"codebook_usage": 1 / 16, "codebook_perplexity": pytest.approx(1.0)}
    # Frequencies 1/2, 1/4, 1/4: exp(1.5 ln 2) = 2 sqrt(2) equally used codes' worth, fewer than the 3 used.
    assert of([0, 0, 1, 2], 8) == {"codebook_usage": 3 / 8, "codebook_perplexity": pytest.approx(2 * 2**0.5)}
    with pytest.raises(ValueError, match="No token ids were counted"):
        codebook_metrics(torch.zeros(8))
    with pytest.raises(ValueError, match=r"one count per code, shape \(codebook_size,\); got \(2, 4\)"):
        codebook_metrics(torch.ones(2, 4))
    with pytest.raises(ValueError, match="non-negative"):
        codebook_metrics(torch.tensor([3.0, -1.0]))


def tiny_vqkd_trainer(args, **kwargs) -> VqkdTrainer:
    """A VQ-KD on a 4x4 grid of 64 codes, distilling a random tiny ViT (16 px, 4 px patches, 16-d features)."""
    config = VqkdConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        decoder_hidden_size=32, decoder_layers=1, decoder_attention_heads=2, decoder_intermediate_size=64,
        codebook_size=64, teacher_dim=16,
    )  # fmt: skip
    vit_config = ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                           image_size=16, patch_size=4)  # fmt: skip
    teacher = VqkdTeacher(ViTModel(vit_config, add_pooling_layer=False), (0.5,) * 3, (0.5,) * 3, grid_size=4)
    return VqkdTrainer(model=VqkdModel(config), args=args, teacher=teacher, **kwargs)


@pytest.mark.parametrize("family", ["dvae", "vqkd"])
def test_tokenizer_trainers_log_the_codebook_metrics_of_each_window(family, tmp_path):
    torch.manual_seed(0)
    pixels = 0.8 * torch.rand(8, 3, 32, 32) + 0.1
    dataset = [{"pixel_values": p} for p in pixels]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, per_device_eval_batch_size=4,
        learning_rate=1e-3, logging_steps=2, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    kwargs = {"train_dataset": dataset, "eval_dataset": dataset, "data_collator": MimDataCollator()}
    if family == "dvae":
        trainer = DvaeTrainer(model=DvaeModel(tiny_dvae_config(image_size=32, num_groups=2)), args=args, **kwargs)
    else:
        trainer = tiny_vqkd_trainer(args, **kwargs)
    assigned = []
    trainer.model.register_forward_hook(lambda module, inputs, output: assigned.append(output.indices.flatten()))
    trainer.train()
    metrics = trainer.evaluate()

    # The same names in every family, and the same meaning: the metrics of all token ids of the logging window
    # (of the whole evaluation set), as the codebook_usage evaluate module computes them, not a mean over batches.
    measurement = load_metric("codebook_usage")
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and len(assigned) == 4 + 2
    for log, window in zip(logs, (assigned[0:2], assigned[2:4])):
        expected = measurement.compute(token_ids=torch.cat(window).tolist(), codebook_size=64)
        assert log["codebook_usage"] == expected["codebook_usage"]
        assert log["codebook_perplexity"] == pytest.approx(expected["codebook_perplexity"])
    expected = measurement.compute(token_ids=torch.cat(assigned[4:]).tolist(), codebook_size=64)
    assert metrics["eval_codebook_usage"] == expected["codebook_usage"]
    assert metrics["eval_codebook_perplexity"] == pytest.approx(expected["codebook_perplexity"])
    logged = {key for entry in trainer.state.log_history for key in entry if "code" in key and "restarts" not in key}
    assert logged == {"codebook_usage", "codebook_perplexity", "eval_codebook_usage", "eval_codebook_perplexity"}

    # Several evaluation sets: each is measured on its own, under its own prefix.
    del assigned[:]
    metrics = trainer.evaluate({"first": dataset[:4], "rest": dataset[4:]})
    for name, ids in (("first", assigned[0]), ("rest", assigned[1])):
        expected = measurement.compute(token_ids=ids.tolist(), codebook_size=64)
        assert metrics[f"eval_{name}_codebook_usage"] == expected["codebook_usage"]
        assert metrics[f"eval_{name}_codebook_perplexity"] == pytest.approx(expected["codebook_perplexity"])


@pytest.mark.parametrize("bf16", [False, True])
def test_the_vqkd_teacher_runs_under_the_runs_mixed_precision(bf16, tmp_path):
    # BEiT v2's code runs the teacher under autocast; accelerate autocasts only the prepared model's forward.
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, bf16=bf16, report_to="none")
    trainer = tiny_vqkd_trainer(args)
    seen = []
    teacher_forward = trainer.teacher.forward
    trainer.teacher.forward = lambda pixels: seen.append(torch.is_autocast_enabled("cpu")) or teacher_forward(pixels)
    pixels = 0.8 * torch.rand(2, 3, 32, 32) + 0.1
    trainer.compute_loss(trainer.model, {"pixel_values": pixels})
    assert seen == [bf16]
