"""scripts/run_mim.py end to end on tiny models: one process, resume, and two-process DDP on CPU."""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from conftest import free_port, launch_two_processes, two_process_evaluations, write_images
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForMaskedImageModeling

from hf_mim.errors import UsageError
from hf_mim.training.run_mim import main

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64"


def run_mim_args(tokenizer, images, output_dir, *extra):
    return [
        "--model_type", "beit", "--tokenizer_name_or_path", tokenizer, "--train_dir", images,
        "--image_size", "32", "--patch_size", "8", "--config_overrides", TINY, "--output_dir", str(output_dir),
        "--do_train", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--logging_steps", "1",
        "--use_cpu", "--report_to", "none", "--dataloader_num_workers", "0", "--seed", "0", *extra,
    ]


def log_steps(output_dir):
    state = json.loads((pathlib.Path(output_dir) / "trainer_state.json").read_text())
    return [entry["step"] for entry in state["log_history"] if "loss" in entry], state


@pytest.mark.smoke
def test_trains_evaluates_and_saves_a_loadable_model(tiny_dvae_dir, image_folder, tmp_path, monkeypatch):
    from hf_mim.data import TwoViewTransform

    evaluation_views = []
    for_evaluation = TwoViewTransform.for_evaluation.__func__
    monkeypatch.setattr(TwoViewTransform, "for_evaluation", classmethod(
        lambda cls, *processors: evaluation_views.append(processors) or for_evaluation(cls, *processors)
    ))  # fmt: skip
    metrics = main(run_mim_args(tiny_dvae_dir, image_folder, tmp_path, "--do_eval", "--train_val_split", "0.25",
                                "--max_steps", "4", "--save_strategy", "no"))
    assert {"eval_loss", "eval_masked_accuracy", "train_loss"} <= set(metrics)
    # Validated on the papers' centre-crop views of both the ViT's and the tokenizer's inputs.
    assert [[processor.size for processor in views] for views in evaluation_views] == [[{"height": 32, "width": 32}, {"height": 16, "width": 16}]]
    assert metrics["train_skipped_images"] == 0
    steps, state = log_steps(tmp_path)
    assert steps == [1, 2, 3, 4]
    assert all({"masked_accuracy", "learning_rate", "loss"} <= set(e) for e in state["log_history"] if "loss" in e)
    model = AutoModelForMaskedImageModeling.from_pretrained(tmp_path)
    assert model.config.vocab_size == 64 and model.tokenizer is not None
    assert type(AutoModel.from_pretrained(tmp_path)).__name__ == "BeitMimModel"
    assert (tmp_path / "tokenizer" / "preprocessor_config.json").exists()
    # The card says what the model saw (it said "not recorded" for a local folder), and keeps it when re-rendered.
    folder = pathlib.Path(image_folder).name
    assert f"Training data: the local image folder `{folder}` (18 images)." in (tmp_path / "README.md").read_text()
    from hf_mim.hub.cards import write_model_card

    write_model_card(tmp_path)
    assert f"the local image folder `{folder}` (18 images)" in (tmp_path / "README.md").read_text()


def test_resume_continues_from_the_saved_step(tiny_dvae_dir, image_folder, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    main(run_mim_args(tiny_dvae_dir, image_folder, straight, "--max_steps", "5", "--save_steps", "2"))
    main(run_mim_args(tiny_dvae_dir, image_folder, resumed, "--max_steps", "5", "--save_steps", "2",
                      "--resume_from_checkpoint", str(straight / "checkpoint-2")))
    _, straight_state = log_steps(straight)
    steps, resumed_state = log_steps(resumed)
    assert resumed_state["global_step"] == 5 and steps == [1, 2, 3, 4, 5]
    # Steps 1-2 come from the checkpoint's history; 3-5 were trained, on the schedule of the
    # uninterrupted run (a restart from scratch would use the rates of steps 1-3).
    rates = lambda state: [e["learning_rate"] for e in state["log_history"] if "loss" in e]
    assert rates(resumed_state) == pytest.approx(rates(straight_state))
    assert (resumed / "checkpoint-4").exists() and not (resumed / "checkpoint-2").exists()


def test_missing_tokenizer_is_a_clear_error(image_folder, tmp_path):
    with pytest.raises(ValueError, match="needs --tokenizer_name_or_path"):
        main(["--model_type", "beit", "--train_dir", image_folder, "--output_dir", str(tmp_path), "--do_train",
              "--use_cpu", "--report_to", "none"])


def test_corrupt_image_is_skipped_and_counted(tiny_dvae_dir, tmp_path):
    images = tmp_path / "images"
    write_images(images, 8)
    (images / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (images / "a" / "empty.png").write_bytes(b"")
    metrics = main(run_mim_args(tiny_dvae_dir, str(images), tmp_path / "out", "--max_steps", "3",
                                "--save_strategy", "no", "--per_device_train_batch_size", "5"))
    assert metrics["train_skipped_images"] >= 2


@pytest.mark.slow
def test_two_process_ddp_run_and_resume(tiny_dvae_dir, image_folder, tmp_path):
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port()), str(REPO / "scripts" / "run_mim.py")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = run_mim_args(tiny_dvae_dir, image_folder, tmp_path, "--save_steps", "2", "--per_device_train_batch_size", "2")
    first = subprocess.run(launch + common + ["--max_steps", "2"], capture_output=True, text=True, env=env,
                           timeout=600, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-4000:]
    checkpoint = tmp_path / "checkpoint-2"
    assert (checkpoint / "rng_state_0.pth").exists() and (checkpoint / "rng_state_1.pth").exists()
    # The resumed leg runs through a launcher that also saves every rank's final weights.
    launch[-1] = str(REPO / "tests" / "ddp_rank_state.py")
    launch[launch.index("--main_process_port") + 1] = str(free_port())
    second = subprocess.run(launch + common + ["--max_steps", "4"], capture_output=True, text=True, env=env,
                            timeout=600, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-4000:]
    steps, state = log_steps(tmp_path)
    assert state["global_step"] == 4 and steps == [1, 2, 3, 4]
    # Steps 1-2 were carried over from checkpoint-2 (a 2-step linear schedule: 1e-3, 5e-4); a fresh 4-step
    # run would have logged 7.5e-4 at step 2.
    assert [e["learning_rate"] for e in state["log_history"] if "loss" in e][1] == pytest.approx(5e-4)
    weights = load_file(tmp_path / "model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())
    # Both processes end with the same model (gradients all-reduced, same start, same updates), equal to the saved one.
    rank_0, rank_1 = load_file(tmp_path / "rank_0.safetensors"), load_file(tmp_path / "rank_1.safetensors")
    assert rank_0.keys() == rank_1.keys() and len(rank_0) > 0
    for name, tensor in rank_0.items():
        assert torch.equal(tensor, rank_1[name]), name
        if name in weights:
            assert torch.equal(tensor, weights[name]), name


@pytest.mark.slow
# --skip_nonfinite_steps adds a reduction of every micro-batch's loss, which the stand-in must join as well.
@pytest.mark.parametrize("extra", [[], ["--skip_nonfinite_steps", "true"]])
def test_a_process_whose_batch_is_all_undecodable_takes_part_in_the_all_reduce(tiny_dvae_dir, tmp_path, extra):
    # It raised, and the other process waited in DDP's all-reduce (a traceback from each rank when both did).
    images = tmp_path / "images"
    write_images(images, 6)
    for index in range(6):  # first in the folder's order, so the stand-in example is looked for past them
        (images / "a" / f"!broken{index}.png").write_bytes(b"not an image")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port()), str(REPO / "tests" / "ddp_rank_state.py")]
    args = run_mim_args(tiny_dvae_dir, str(images), tmp_path / "out", "--per_device_train_batch_size", "1",
                        "--max_steps", "6", "--save_strategy", "no", *extra)
    completed = subprocess.run(launch + args, capture_output=True, text=True, timeout=300,
                               env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-4000:]
    output = completed.stderr + completed.stdout
    assert "every image of it was undecodable" in output
    # What every process would say alike is said once: the recipe warning, the count over all processes.
    assert output.count("unset, so transformers' default") == 1 and output.count("train_skipped_images = 6:") == 1
    results = json.loads((tmp_path / "out" / "train_results.json").read_text())
    # One epoch (12 images, 2 processes x 1 x 6 steps): each broken image counted once, not again when looked past.
    assert results["train_skipped_images"] == 6 and results["train_steps"] == 6 and results["train_samples"] == 6
    rank_0, rank_1 = (load_file(tmp_path / "out" / f"rank_{rank}.safetensors") for rank in (0, 1))
    assert all(torch.equal(tensor, rank_1[name]) for name, tensor in rank_0.items())
    assert all(torch.isfinite(tensor).all() for tensor in rank_0.values())


@pytest.mark.slow
def test_undecodable_validation_images_change_only_the_skipped_count_under_two_processes(tiny_dvae_dir, tmp_path):
    # 6 photos and 2 broken files, batches of 2: rank 1's second batch is both broken. It gathered no loss while
    # rank 0 waited in that gather (a hang). Without the broken files rank 1's last batch repeats the first images
    # (accelerate's padding), which must not count either.
    write_images(tmp_path / "train", 8)
    flags = ("--per_device_train_batch_size", "2", "--max_steps", "2", "--save_strategy", "no", "--do_eval",
             "--per_device_eval_batch_size", "2")  # fmt: skip
    # Sorted last, so the photos keep their indices (and their masks' seeds).
    without, with_broken = two_process_evaluations(
        tmp_path, REPO / "scripts" / "run_mim.py",
        lambda validation, output: run_mim_args(tiny_dvae_dir, tmp_path / "train", output, *flags,
                                                "--validation_dir", validation),  # fmt: skip
        ["b/zz_broken0.png", "b/zz_broken1.png"],
    )
    assert with_broken["eval_skipped_images"] == 2 and without["eval_skipped_images"] == 0
    # The mean over the same 6 images, each once (the masks draw the same count on every image).
    assert with_broken["eval_loss"] == pytest.approx(without["eval_loss"], rel=1e-6)


@pytest.mark.slow
def test_a_streamed_validation_set_evaluates_under_two_processes(tiny_dvae_dir, image_folder, tmp_path):
    # accelerate dispatches a stream's batches and concatenates them: a collator adding non-tensors broke it.
    write_images(tmp_path / "validation", 6, seed=1)
    args = run_mim_args(tiny_dvae_dir, image_folder, tmp_path / "out", "--streaming", "--max_steps", "2",
                        "--per_device_train_batch_size", "2", "--save_strategy", "no", "--do_eval",
                        "--validation_dir", tmp_path / "validation", "--per_device_eval_batch_size", "2")  # fmt: skip
    completed = launch_two_processes(REPO / "scripts" / "run_mim.py", args, cwd=tmp_path, timeout=240)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert math.isfinite(json.loads((tmp_path / "out" / "eval_results.json").read_text())["eval_loss"])


def test_two_processes_whose_clocks_disagree_stop_at_the_same_step(tiny_dvae_dir, image_folder, tmp_path):
    # Rank 1 is past its time budget at the first step, rank 0 is not: stopping alone, rank 1 used to leave rank 0
    # waiting in DDP's all-reduce of the next step.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port()), str(REPO / "tests" / "ddp_skewed_budget.py")]
    args = run_mim_args(tiny_dvae_dir, image_folder, tmp_path, "--per_device_train_batch_size", "2", "--max_steps",
                        "6", "--max_train_seconds", "1000", "--save_strategy", "no")
    completed = subprocess.run(launch + args, capture_output=True, text=True, timeout=120,
                               env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert json.loads((tmp_path / "trainer_state.json").read_text())["global_step"] == 1


def test_a_batch_of_only_broken_images_is_skipped(tiny_dvae_dir, tmp_path):
    images = tmp_path / "images" / "a"
    images.mkdir(parents=True)
    for index in range(4):
        (images / f"broken{index}.png").write_bytes(b"not an image")
    # Every batch is empty: each step is skipped with a warning instead of crashing, and a run that decoded
    # nothing fails with the counts instead of saving a random-init model as if it had trained.
    with pytest.raises(UsageError, match="8 training images could not be decoded and 0 could"):
        main(run_mim_args(tiny_dvae_dir, str(images.parent), tmp_path / "out", "--max_steps", "2",
                          "--save_strategy", "no"))
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_no_action_is_an_error_not_a_silent_success(tiny_dvae_dir, image_folder, tmp_path):
    args = [a for a in run_mim_args(tiny_dvae_dir, image_folder, tmp_path) if a != "--do_train"]
    with pytest.raises(ValueError, match="Nothing to do"):
        main(args)


def test_config_overrides_set_geometry_and_a_matching_vocab_size(tiny_dvae_dir, image_folder, tmp_path):
    # No --image_size/--patch_size: the geometry comes from the overrides alone. vocab_size may repeat the tokenizer's
    # codebook size (it used to be passed twice to the config: "got multiple values for keyword argument").
    args = run_mim_args(tiny_dvae_dir, image_folder, tmp_path, "--max_steps", "1", "--save_strategy", "no")
    for flag in ("--image_size", "--patch_size"):
        del args[args.index(flag) : args.index(flag) + 2]
    args[args.index("--config_overrides") + 1] = f"{TINY},image_size=32,patch_size=8,vocab_size=64,drop_path_rate=0.2"
    main(args)
    config = AutoModelForMaskedImageModeling.from_pretrained(tmp_path).config
    assert (config.image_size, config.patch_size, config.vocab_size, config.drop_path_rate) == (32, 8, 64, 0.2)


@pytest.mark.parametrize(
    "override, message",
    [
        ("vocab_size=512", "vocab_size=512 conflicts with the tokenizer's codebook_size=64.*codebook_size=512"),
        ("image_size=64", "--image_size 32 and --config_overrides image_size=64 disagree"),
        ("tokenizer_config=x", "cannot set tokenizer_config.*--tokenizer_name_or_path"),
        ("hidden_size", "name=value pairs, got 'hidden_size'"),
        ("drop_path_rate=0.1,drop_path_rate=0.2", "sets drop_path_rate more than once.*give each name once"),
    ],
)
def test_config_overrides_that_conflict_with_derived_values_are_clear_errors(
    tiny_dvae_dir, image_folder, tmp_path, override, message
):
    args = run_mim_args(tiny_dvae_dir, image_folder, tmp_path, "--max_steps", "1")
    args[args.index("--config_overrides") + 1] = f"{TINY},{override}"
    with pytest.raises(ValueError, match=message):
        main(args)


def test_vocab_size_override_with_fit_tokenizer_names_fit_codebook_size(image_folder, tmp_path, monkeypatch):
    from hf_mim.training import pretraining

    monkeypatch.setattr(pretraining, "fit_tokenizer_for_mim", lambda *args, **kwargs: pytest.fail("fitted first"))
    with pytest.raises(ValueError, match="vocab_size=32 conflicts .* codebook_size=16.*--fit_codebook_size 32"):
        main(["--model_type", "ccvit", "--fit_tokenizer", "--fit_codebook_size", "16", "--train_dir", image_folder,
              "--image_size", "32", "--patch_size", "8", "--config_overrides", f"{TINY},vocab_size=32",
              "--output_dir", str(tmp_path), "--do_train", "--use_cpu", "--report_to", "none"])


def test_architecture_flags_with_a_checkpoint_are_an_error_not_ignored(tiny_mim_dir, image_folder, tmp_path):
    with pytest.raises(ValueError, match="--config_overrides, --image_size describe a model trained from scratch"):
        main(["--model_type", "beit", "--model_name_or_path", tiny_mim_dir, "--train_dir", image_folder,
              "--config_overrides", "drop_path_rate=0.2", "--image_size", "32", "--output_dir", str(tmp_path),
              "--do_train", "--use_cpu", "--report_to", "none"])


def test_a_warm_up_longer_than_the_run_is_said(tiny_dvae_dir, image_folder, tmp_path, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="hf_mim.training.trainer"):
        main(run_mim_args(tiny_dvae_dir, image_folder, tmp_path, "--max_steps", "2", "--warmup_steps", "10",
                          "--save_strategy", "no"))  # fmt: skip
    assert "--warmup_steps 10 is 10 steps, longer than the run's 2: the learning rate never reaches" in caplog.text
    # So are intervals beyond the run: the evaluations and checkpoints asked for would never come.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_mim.training.trainer"):
        main(run_mim_args(tiny_dvae_dir, image_folder, tmp_path / "intervals", "--max_steps", "2", "--do_eval",
                          "--train_val_split", "0.25", "--eval_strategy", "steps", "--eval_steps", "50",
                          "--save_steps", "3"))  # fmt: skip
    assert "--eval_steps 50 is beyond the run's 2 steps: no evaluation runs during training" in caplog.text
    assert "--save_steps 3 is beyond the run's 2 steps: no checkpoint is saved during training" in caplog.text
    assert "--logging_steps" not in caplog.text  # 1, within the run


def test_undecodable_validation_images_are_counted_apart_from_training_ones(tiny_dvae_dir, tmp_path):
    # One counter served both: evaluations during training added to train_skipped_images, and the eval count was lost.
    train, validation = tmp_path / "train", tmp_path / "validation"
    write_images(train, 8)
    write_images(validation, 4)
    (train / "a" / "broken.png").write_bytes(b"not a png")
    for index in range(3):
        (validation / "b" / f"broken{index}.png").write_bytes(b"")
    metrics = main(run_mim_args(tiny_dvae_dir, str(train), tmp_path / "out", "--validation_dir", str(validation),
                                "--do_eval", "--max_steps", "4", "--eval_strategy", "steps", "--eval_steps", "2",
                                "--save_strategy", "no", "--per_device_eval_batch_size", "4"))  # fmt: skip
    # Its one broken file, drawn once in each epoch the 4 steps of 4 images reach (9 images: 2 epochs).
    assert 1 <= metrics["train_skipped_images"] <= 2
    assert metrics["eval_skipped_images"] == 3
    assert json.loads((tmp_path / "out" / "eval_results.json").read_text())["eval_skipped_images"] == 3


def test_a_resumed_run_reports_the_undecodable_images_of_the_whole_run(tiny_dvae_dir, tmp_path):
    # The count covered the resumed launch only.
    images = tmp_path / "images"
    write_images(images, 4)
    (images / "a" / "broken.png").write_bytes(b"not a png")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    steps = ("--max_steps", "4", "--save_steps", "2")
    expected = main(run_mim_args(tiny_dvae_dir, str(images), straight, *steps))["train_skipped_images"]
    assert json.loads((straight / "checkpoint-2" / "hf_mim_run.json").read_text())["train_skipped_images"] >= 1
    metrics = main(run_mim_args(tiny_dvae_dir, str(images), resumed, *steps,
                                "--resume_from_checkpoint", str(straight / "checkpoint-2")))  # fmt: skip
    # 5 images in batches of 4: 2 steps an epoch, the broken file drawn once in each.
    assert expected == 2 and metrics["train_skipped_images"] == expected


def test_a_streamed_batch_of_undecodable_images_is_skipped_and_counted(tiny_dvae_dir, tmp_path):
    # accelerate dispatches a stream's batches and failed on the empty batch the collator returned for them.
    images = tmp_path / "images"
    write_images(images, 4, classes=("b",))
    (images / "a").mkdir()
    for index in range(2):
        (images / "a" / f"{index}.png").write_bytes(b"not a png")
    metrics = main(run_mim_args(tiny_dvae_dir, str(images), tmp_path / "out", "--streaming", "--max_steps", "2",
                                "--per_device_train_batch_size", "2", "--save_strategy", "no"))  # fmt: skip
    assert metrics["train_skipped_images"] == 2 and (tmp_path / "out" / "model.safetensors").exists()
