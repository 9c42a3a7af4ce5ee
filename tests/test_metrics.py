"""hf_mim's evaluate modules load offline by path (conftest sets HF_HUB_OFFLINE) and compute the right numbers;
wheels ship them."""

import pathlib
import tomllib

import evaluate
import pytest

from hf_mim.evaluation.metrics import METRIC_NAMES, METRICS_DIR, load_metric, metric_path

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
    assert result["num_used_codes"] == 4 and result["codebook_usage"] == 0.5
    assert result["perplexity"] == pytest.approx(4.0)
    assert measurement.compute(token_ids=[7] * 10, codebook_size=8)["perplexity"] == pytest.approx(1.0)
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
