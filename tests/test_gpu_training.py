"""Training on GPUs, checked without one: the trainer's device-side reductions on the meta device, a refused
non-distributed multi-process launch, honest throughput under a time budget, persistent DataLoader workers that
see every epoch, and the GPU check's CPU dry mode."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_run_mim import REPO, run_mim_args
from transformers import AutoModelForMaskedImageModeling

from hf_mim.data import MimDataCollator
from hf_mim.data.datasets import SeededTransformedDataset
from hf_mim.errors import UsageError
from hf_mim.training.arguments import check_distributed_launch
from hf_mim.training.budget import BudgetProgressCallback
from hf_mim.training.arguments import MimTrainingArguments
from hf_mim.training.run_mim import main
from hf_mim.training.trainer import MimTrainer

META = torch.device("meta")


@pytest.fixture
def trainer(tiny_mim_dir, tmp_path):
    model = AutoModelForMaskedImageModeling.from_pretrained(tiny_mim_dir)
    args = MimTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    return MimTrainer(model=model, args=args, data_collator=MimDataCollator())


def test_metric_window_stays_on_the_device_of_the_model_outputs(trainer):
    # Model outputs on a device the step count is not created on: with CUDA, the first log of every run crashed
    # (`torch.stack` of CUDA sums and a CPU step count); meta fails the same way.
    for _ in range(3):
        trainer._accumulate_metrics("train", {"loss": torch.ones((), device=META), "masked_accuracy": torch.ones((), device=META)})
    names, totals = trainer.window_totals("train")
    assert names == ["masked_accuracy"] and totals.device == META and totals.shape == (2,)
    assert trainer.window_totals("train") == ([], None)


def test_nonfinite_losses_are_counted_on_the_device(trainer):
    trainer.count_nonfinite_loss(torch.ones((), device=META))
    trainer.count_nonfinite_loss(torch.full((), float("nan"), device=META))
    counted = trainer.nonfinite_loss_count()
    assert counted.device == META and counted.dtype == torch.int32
    assert trainer.nonfinite_loss_count() is None


def test_a_launch_of_several_processes_that_are_not_distributed_is_refused(monkeypatch, tmp_path):
    args = MimTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    check_distributed_launch(args)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="2 processes.*--use_cpu"):
        check_distributed_launch(args)


@pytest.mark.slow
def test_multi_gpu_launch_without_gpus_stops_with_one_line(tiny_dvae_dir, image_folder, tmp_path):
    args = [arg for arg in run_mim_args(tiny_dvae_dir, image_folder, tmp_path / "out", "--max_steps", "2") if arg != "--use_cpu"]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(REPO / "scripts" / "run_mim.py"), *args]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "--use_cpu" in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr.split("error: ")[0].split("\n")[-1]
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_a_time_budget_reports_what_was_processed(tiny_dvae_dir, image_folder, tmp_path):
    metrics = main(run_mim_args(tiny_dvae_dir, image_folder, tmp_path, "--max_steps", "100000",
                                "--max_train_seconds", "2", "--save_strategy", "no", "--logging_steps", "50"))  # fmt: skip
    steps = metrics["train_steps"]
    assert 0 < steps < 100000
    # 24 images in batches of 4: every batch is full.
    assert metrics["train_samples"] == 4 * steps
    assert metrics["train_samples_per_second"] == pytest.approx(metrics["train_samples"] / metrics["train_runtime"], rel=1e-2)
    assert metrics["train_steps_per_second"] == pytest.approx(steps / metrics["train_runtime"], rel=1e-2)
    card = (tmp_path / "README.md").read_text()
    assert "| `max_train_seconds` | 2.0 |" in card and "`max_steps`" not in card
    assert f"Trained for {steps} optimisation steps" in card


def test_the_progress_bar_of_a_budgeted_run_counts_seconds(trainer, tmp_path):
    args = MimTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_train_seconds=30)
    budgeted = MimTrainer(model=trainer.model, args=args, data_collator=MimDataCollator())
    bars = [type(callback) for callback in budgeted.callback_handler.callbacks if "Progress" in type(callback).__name__]
    assert bars == [BudgetProgressCallback]


@pytest.mark.parametrize(("workers", "flag", "expected"), [(2, None, True), (0, None, False), (2, False, False)])
def test_dataloader_workers_persist_by_default(workers, flag, expected, tmp_path):
    extra = {} if flag is None else {"dataloader_persistent_workers": flag}
    args = MimTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                                dataloader_num_workers=workers, **extra)  # fmt: skip
    assert args.dataloader_persistent_workers is expected


class _Draw:
    """A transform that returns a number drawn from the example's generator (its epoch shows in it)."""

    image_column, keep_columns = "x", ()

    def transform_example(self, example, rng):
        return {"x": example["x"], "draw": float(rng.random())}


def test_persistent_workers_see_every_epoch(tmp_path):
    import datasets

    dataset = SeededTransformedDataset(datasets.Dataset.from_dict({"x": list(range(4))}), _Draw(), seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=1, persistent_workers=True)
    draws = []
    for epoch in range(2):
        dataset.set_epoch(epoch)
        draws.append([float(value) for value in next(iter(loader))["draw"]])
    expected = [[np.random.default_rng((0, epoch, index)).random() for index in range(4)] for epoch in range(2)]
    assert np.allclose(draws, expected)


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    from conftest import write_images

    write_images(tmp_path / "data" / "train", 16)
    write_images(tmp_path / "data" / "val", 8, seed=1)
    output = tmp_path / "gpu_check.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--dry_run", "--data", str(tmp_path / "data"),
         "--output", str(output), "--work_dir", str(tmp_path / "work")],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads(output.read_text())
    entries = {entry["entry"]: entry for entry in report["entries"]}
    assert set(entries) == {
        "train_tokenizer dvae", "train_tokenizer vqkd", "train_tokenizer kmeans", "run_mim beit", "run_mim beitv2",
        "run_mim mcbeit", "run_mim ccvit", "features + linear probe", "export", "visualize",
    }  # fmt: skip
    assert all(entry["status"] == "ok" for entry in entries.values())
    assert entries["run_mim beit"]["train_samples"] == 2 * 4
    assert "| run_mim ccvit | ok |" in result.stdout
    assert report["multi_gpu"]["status"].startswith("skipped")


@pytest.mark.parametrize("tokenizer_autocast", [False, True])
def test_targets_are_computed_in_float32_under_autocast_unless_asked(tokenizer_autocast):
    from test_beitv2 import batch, tiny_beitv2_config

    from hf_mim import Beitv2ForMaskedImageModeling

    torch.manual_seed(0)
    model = Beitv2ForMaskedImageModeling(tiny_beitv2_config(tokenizer_autocast=tokenizer_autocast)).eval()
    dtypes = []
    first_linear = next(module for module in model.tokenizer.modules() if isinstance(module, torch.nn.Linear))
    first_linear.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    _, tokenizer_view, _ = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        targets = model.get_targets(tokenizer_view)
    # VQ-KD's ViT encoder would run in bf16 under the step's autocast; by default the targets are fp32's.
    assert dtypes == [torch.bfloat16 if tokenizer_autocast else torch.float32]
    if not tokenizer_autocast:
        assert torch.equal(targets, model.get_targets(tokenizer_view))
    assert model.config.to_dict()["tokenizer_autocast"] is tokenizer_autocast


def test_mcbeit_soft_targets_come_from_float32_logits_under_autocast():
    from conftest import tiny_mcbeit_config
    from test_vqkd import tiny_vqkd_config

    from hf_mim import McBeitForMaskedImageModeling

    torch.manual_seed(0)
    model = McBeitForMaskedImageModeling(tiny_mcbeit_config(tiny_vqkd_config(kmeans_init=False))).eval()
    view = torch.rand(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model.get_tokenizer_logits(view)
    assert torch.equal(logits, model.get_tokenizer_logits(view))


def test_tokenizer_trainer_counts_codes_on_the_device(tmp_path):
    # bincount has no meta kernel (it reads the largest id back to the host, a sync per step on a GPU).
    from conftest import tiny_dvae_config

    from hf_mim import DvaeModel
    from hf_mim.training.tokenizer_trainer import TokenizerTrainer

    args = MimTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = TokenizerTrainer(model=DvaeModel(tiny_dvae_config()), args=args, data_collator=MimDataCollator())

    class Outputs(dict):
        indices = torch.zeros(2, 16, dtype=torch.long, device=META)

    original = MimTrainer.compute_loss
    MimTrainer.compute_loss = lambda self, model, inputs, return_outputs=False, num_items_in_batch=None: (torch.zeros((), device=META), Outputs())
    try:
        trainer.compute_loss(trainer.model.train(), {})
    finally:
        MimTrainer.compute_loss = original
    assert trainer._code_counts["train"].device == META


def test_batches_are_pinned_only_for_a_gpu(tmp_path):
    # Without a GPU (and without --use_cpu, as the demo runs) transformers pinned batches anyway, and torch warned at
    # every DataLoader that pinning needs an accelerator.
    assert MimTrainingArguments(output_dir=str(tmp_path), report_to="none").dataloader_pin_memory is torch.cuda.is_available()


def test_pinned_batches_are_copied_without_waiting_for_the_host(tmp_path):
    pinned = MimTrainingArguments(output_dir=str(tmp_path), report_to="none", dataloader_pin_memory=True)
    assert pinned.accelerator_config.non_blocking
    unpinned = MimTrainingArguments(output_dir=str(tmp_path), report_to="none", dataloader_pin_memory=False)
    assert not unpinned.accelerator_config.non_blocking
    # A user's own accelerator config is left as given.
    given = MimTrainingArguments(output_dir=str(tmp_path), report_to="none", dataloader_pin_memory=True,
                                 accelerator_config={"non_blocking": False})
    assert not given.accelerator_config.non_blocking


@pytest.mark.parametrize("skip", [False, True])
def test_the_logged_loss_is_only_filtered_on_the_host_when_non_finite_steps_are_skipped(skip, tmp_path):
    # transformers' filter reads every step's loss on the host; a non-finite loss stops the run at the next log.
    args = MimTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, skip_nonfinite_steps=skip)
    assert args.logging_nan_inf_filter is skip


def test_the_end_of_training_writes_no_checkpoint_save_steps_did_not_ask_for(tiny_dvae_dir, image_folder, tmp_path):
    # Trainer added checkpoint-5 (model + optimiser state) beside the final model saved in output_dir.
    main(run_mim_args(tiny_dvae_dir, image_folder, tmp_path, "--max_steps", "5", "--save_steps", "2"))
    assert sorted(path.name for path in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert (tmp_path / "model.safetensors").exists()


def test_training_with_transformers_learning_rate_and_weight_decay_is_warned_of(tmp_path, caplog):
    from hf_mim.training.arguments import warn_of_transformers_optimisation_defaults

    def warned(**flags):
        caplog.clear()
        args = MimTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, do_train=True, **flags)
        with caplog.at_level("WARNING", logger="hf_mim.training.arguments"):
            warn_of_transformers_optimisation_defaults(args, "the recipe: --learning_rate 1")
        return caplog.text

    text = warned()
    assert "--learning_rate is unset, so transformers' default applies (5e-05)" in text
    assert "the recipe: --learning_rate 1" in text
    assert warned(learning_rate=1e-3) == ""
    # Every optimiser flag of the recipe left at transformers' default is named, with that default.
    recipe = "the recipe: --learning_rate 1 --max_grad_norm 3.0 --lr_scheduler_type cosine --layer_decay 0.65"
    caplog.clear()
    args = MimTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, do_train=True,
                                learning_rate=1e-3)  # fmt: skip
    with caplog.at_level("WARNING", logger="hf_mim.training.arguments"):
        warn_of_transformers_optimisation_defaults(args, recipe)
    assert "--max_grad_norm, --lr_scheduler_type are unset, so transformers' defaults apply (1, linear)" in caplog.text


@pytest.mark.parametrize(
    "command, flags, recipe",
    [
        ("run_mim", ["--model_type", "beit"], "BEiT at batch 2048: --learning_rate 1.5e-3 --weight_decay 0.05 --max_grad_norm 3.0"),
        # BEiT v2 (300 epochs), mc-BEiT and CCViT train with Adam's beta2 at 0.98, not transformers' 0.999.
        ("run_mim", ["--model_type", "mcbeit"], "--learning_rate 1.5e-3 --weight_decay 0.05 --adam_beta2 0.98"),
        ("train_tokenizer", ["--tokenizer_type", "dvae"], "--learning_rate 1e-3"),
        ("train_tokenizer", ["--tokenizer_type", "vqkd"], "--learning_rate 2e-4 --weight_decay 1e-4"),
        ("run_image_classification", ["--model_name_or_path", "unused"], "--learning_rate 4e-3 --weight_decay 0.05"),
    ],
)
def test_each_training_command_warns_of_transformers_optimisation_defaults_before_reading_data(
    command, flags, recipe, tmp_path, caplog
):
    # The warning comes before the data: here a missing --train_dir ends the run right after it.
    import importlib

    module = importlib.import_module(f"hf_mim.training.{command}")
    argv = [*flags, "--train_dir", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "out"), "--do_train",
            "--use_cpu", "--report_to", "none"]
    with caplog.at_level("WARNING", logger="hf_mim.training.arguments"), pytest.raises(UsageError):
        module.main(argv)
    assert "--learning_rate" in caplog.text and "unset, so transformers' default" in caplog.text and recipe in caplog.text
