"""The one-command demo (reduced: tiny model, a few steps) and the pieces it adds: time budget, CCViT in run_mim."""

import json

import numpy as np
import pytest
from PIL import Image
from transformers import TrainerControl, TrainerState, TrainingArguments

from hf_mim.demo import digits_images, main, write_sample_crops
from hf_mim.errors import UsageError
from hf_mim.training.budget import TimeBudgetCallback
from hf_mim.families import MIM_METHODS
from hf_mim.training.pretraining import DataArguments, build_replacement_generator


@pytest.mark.smoke
def test_reduced_demo_writes_checkpoint_card_figures_and_probe_results(tmp_path, capsys):
    out = tmp_path / "demo"
    summary = main([
        "--output_dir", str(out), "--num_crops", "16", "--codebook_size", "16", "--kmeans_iterations", "2",
        "--hidden_size", "32", "--num_hidden_layers", "2", "--num_attention_heads", "2", "--batch_size", "8",
        "--max_steps", "6", "--budget_seconds", "600", "--num_probe_train", "100", "--num_probe_test", "50",
    ])  # fmt: skip
    assert len(list((out / "sample_photos" / "train" / "photos").glob("*.jpg"))) == 16
    assert (out / "kmeans_tokenizer" / "config.json").exists()
    model_dir = out / "ccvit"
    assert json.loads((model_dir / "config.json").read_text())["model_type"] == "hf_mim_ccvit"
    assert json.loads((model_dir / "trainer_state.json").read_text())["global_step"] == 6
    card = (model_dir / "README.md").read_text()
    assert "sklearn-digits" in card and "Linear probe" in card and "k-NN (frozen features), k = 20" in card
    assert card.count("randomly initialised (baseline)") == 2
    # A later render (e.g. push_to_hub.py) keeps the baselines, and the model-index holds only this model's results.
    from huggingface_hub import ModelCard

    from hf_mim.hub.cards import write_model_card

    write_model_card(model_dir)
    assert (model_dir / "README.md").read_text().count("randomly initialised (baseline)") == 2
    assert len(ModelCard.load(model_dir / "README.md").data.eval_results) == 2
    printed = capsys.readouterr().out
    assert all(f"[demo {phase}/4, " in printed for phase in range(1, 5))
    for name in ("mim_panel", "codebook_usage", "training_curves"):
        with Image.open(summary["figures"][name]) as image:
            assert image.format == "PNG"
    written = json.loads((out / "demo_results.json").read_text())
    assert written["probe_sizes"] == {"train": 100, "test": 50} and written["train_steps"] == 6
    for encoder in ("pretrained", "random_init"):
        assert set(written["results"][encoder]) == {"knn_top1_k10", "knn_top1_k20", "linear_probe_top1"}
        assert all(0.0 <= value <= 1.0 for value in written["results"][encoder].values())


def test_demo_bad_arguments(tmp_path):
    with pytest.raises(UsageError, match="not both"):
        main(["--output_dir", str(tmp_path), "--train_dir", str(tmp_path), "--dataset_name", "x"])
    with pytest.raises(UsageError, match="leaves none of scikit-learn's 1797 digits"):
        main(["--output_dir", str(tmp_path), "--num_probe_train", "1797"])
    with pytest.raises(ValueError, match="num_crops"):
        write_sample_crops(str(tmp_path), 0)


@pytest.mark.smoke
def test_sample_crops_and_digits():
    images, labels = digits_images(16)
    assert len(images) == len(labels) == 1797 and set(labels) == set(range(10))
    assert images[0].size == (16, 16) and images[0].mode == "RGB"
    assert np.asarray(images[0]).max() > 0


def test_time_budget_stops_at_the_first_step_past_it(monkeypatch):
    clock = iter([100.0, 100.5, 102.0])
    monkeypatch.setattr("hf_mim.training.budget.time.monotonic", lambda: next(clock))
    callback, control = TimeBudgetCallback(1.0), TrainerControl()
    args, state = TrainingArguments(output_dir="unused", report_to="none"), TrainerState()
    callback.on_train_begin(args, state, control)
    callback.on_step_end(args, state, control)
    assert not control.should_training_stop
    callback.on_step_end(args, state, control)
    assert control.should_training_stop
    with pytest.raises(ValueError, match="positive"):
        TimeBudgetCallback(0)


def test_every_process_stops_when_one_is_past_its_budget(monkeypatch):
    # Clocks of processes differ: a process stopping a step early left the others waiting in DDP's all-reduce.
    from hf_mim.training import budget

    clock = iter([100.0, 100.5, 100.5])
    monkeypatch.setattr(budget.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(budget, "is_distributed", lambda: True)
    reduced = []

    def other_process_is_over(shared):
        reduced.append(shared.tolist())
        shared[0] += 1.0

    monkeypatch.setattr(budget, "all_reduce_", other_process_is_over)
    callback, control = TimeBudgetCallback(1.0), TrainerControl()
    args, state = TrainingArguments(output_dir="unused", report_to="none", use_cpu=True), TrainerState(global_step=0)
    callback.on_train_begin(args, state, control)
    state.global_step = 1
    callback.on_step_end(args, state, control)
    assert reduced == [[0.0, 0.5]] and control.should_training_stop


def test_processes_agree_on_the_budget_about_once_a_second_not_every_step(monkeypatch):
    # Each agreement is an all-reduce read on the host, which waits for the GPU: one per step would keep the host
    # from queueing the next step. The processes check at the steps the previous check agreed on.
    from hf_mim.training import budget

    now = [100.0]
    monkeypatch.setattr(budget.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(budget, "is_distributed", lambda: True)
    checks = []

    def another_process_is_over_from_step_21(shared):
        checks.append(state.global_step)
        shared[1] = 0.1  # the processes' mean seconds per step (world() is one process here)
        if state.global_step >= 21:
            shared[0] += 1.0

    monkeypatch.setattr(budget, "all_reduce_", another_process_is_over_from_step_21)
    callback, control = TimeBudgetCallback(1000.0), TrainerControl()
    args, state = TrainingArguments(output_dir="unused", report_to="none", use_cpu=True), TrainerState(global_step=0)
    callback.on_train_begin(args, state, control)
    while not control.should_training_stop:
        now[0] += 0.1
        state.global_step += 1
        callback.on_step_end(args, state, control)
    # The first step, then every tenth (0.1 s per step, checks a second apart), and the stop at the first check
    # after the other process's budget ran out.
    assert checks == [1, 11, 21] and state.global_step == 21


def test_replacement_generator_is_ccvit_only():
    generator = build_replacement_generator(DataArguments(), MIM_METHODS["ccvit"], 8)
    assert generator.num_replaced_patches == 7  # 20 of 196 scaled to 64 patches
    mask = np.zeros((8, 8), dtype=bool)
    assert generator(mask).sum() == 7
    assert build_replacement_generator(DataArguments(), MIM_METHODS["beit"], 8) is None
    with pytest.raises(ValueError, match=r"methods that replace patches \(ccvit\); --model_type beit replaces no"):
        build_replacement_generator(DataArguments(num_replaced_patches=3), MIM_METHODS["beit"], 8)


def test_a_check_that_timed_no_time_still_checks_again_soon(monkeypatch):
    # A step time of ~0 (a coarse clock) put the next check a billion steps away: the budget was never enforced again.
    from hf_mim.training import budget

    monkeypatch.setattr(budget.time, "monotonic", lambda: 100.0)
    monkeypatch.setattr(budget, "is_distributed", lambda: True)
    monkeypatch.setattr(budget, "all_reduce_", lambda shared: None)
    callback, control = TimeBudgetCallback(10.0), TrainerControl()
    args, state = TrainingArguments(output_dir="unused", report_to="none", use_cpu=True), TrainerState(global_step=0)
    callback.on_train_begin(args, state, control)
    state.global_step = 1
    callback.on_step_end(args, state, control)
    assert callback.next_check == 1 + 1000


def test_probe_folders_are_decoded_up_front_and_their_broken_images_left_out(tmp_path):
    from conftest import write_images

    from hf_mim.demo import DemoArguments, probe_data

    for split in ("train", "val"):
        write_images(tmp_path / split, 4)
        (tmp_path / split / "a" / "broken.png").write_bytes(b"not an image")
    args = DemoArguments(output_dir=str(tmp_path / "out"), probe_train_dir=str(tmp_path / "train"),
                         probe_validation_dir=str(tmp_path / "val"))  # fmt: skip
    train_images, train_labels, test_images, test_labels, name = probe_data(args)
    assert len(train_images) == len(train_labels) == 4 and len(test_images) == len(test_labels) == 4
    assert all(isinstance(image, Image.Image) for image in train_images + test_images)
    assert sorted(train_labels) == [0, 0, 1, 1] and name == "train"
