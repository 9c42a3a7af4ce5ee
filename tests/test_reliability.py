"""Reliability guarantees (README "Reliability"): exact resumption after SIGKILL, per-example data randomness."""

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from hf_mim.data import BlockwiseMaskingGenerator, MimDataCollator, TwoViewTransform, apply_transform, example_rng
from hf_mim.errors import UsageError
from hf_mim.models import MimImageProcessor
from hf_mim.training.run_mim import main

from test_run_mim import REPO, run_mim_args


def complete_checkpoints(output_dir: pathlib.Path) -> list[pathlib.Path]:
    """Checkpoints whose trainer_state.json (written last by Trainer) is readable, oldest first."""
    complete = []
    for path in sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])):
        try:
            json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        complete.append(path)
    return complete


def test_run_killed_with_sigkill_resumes_to_the_weights_of_an_uninterrupted_run(tiny_dvae_dir, image_folder, tmp_path):
    # Colour jitter, random crops, flips and blockwise masks are all on: every source of data randomness is exercised.
    steps = ("--max_steps", "10", "--save_steps", "2")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    main(run_mim_args(tiny_dvae_dir, image_folder, straight, *steps))

    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    process = subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "run_mim.py"), *run_mim_args(tiny_dvae_dir, image_folder, killed, *steps)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 300
    while not complete_checkpoints(killed) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate()
    assert process.returncode == -signal.SIGKILL, f"the run ended before it could be killed: {stderr.decode()[-2000:]}"
    assert not (killed / "model.safetensors").exists()
    checkpoint = complete_checkpoints(killed)[-1]
    assert int(checkpoint.name.split("-")[1]) < 10

    main(run_mim_args(tiny_dvae_dir, image_folder, killed, *steps, "--resume_from_checkpoint", str(checkpoint)))
    expected, resumed = load_file(straight / "model.safetensors"), load_file(killed / "model.safetensors")
    assert expected.keys() == resumed.keys()
    # Bitwise: same data, same order, same dropout draws, same kernels on one CPU process.
    for name in expected:
        assert torch.equal(expected[name], resumed[name]), name


def test_an_example_draws_the_same_views_and_mask_whatever_the_batch_and_workers(image_folder):
    import datasets

    processor = MimImageProcessor(size={"height": 16, "width": 16}, crop_size={"height": 16, "width": 16})
    raw = datasets.load_dataset("imagefolder", data_files={"train": os.path.join(image_folder, "**")})["train"]
    dataset = apply_transform(raw, "image", TwoViewTransform(processor), seed=7)
    collator = MimDataCollator(BlockwiseMaskingGenerator(2, 2, 1))

    torch.manual_seed(0)
    whole = collator(dataset.__getitems__([3, 1, 2]))
    torch.manual_seed(1)  # torch's global RNG plays no part
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=2, collate_fn=collator,
                                         sampler=[1, 3, 2])
    singles = {index: batch for index, batch in zip([1, 3, 2], loader)}
    for position, index in enumerate([3, 1, 2]):
        assert torch.equal(whole["pixel_values"][position], singles[index]["pixel_values"][0])
        assert torch.equal(whole["bool_masked_pos"][position], singles[index]["bool_masked_pos"][0])

    dataset.set_epoch(1)
    next_epoch = collator(dataset.__getitems__([3, 1, 2]))
    assert not torch.equal(whole["pixel_values"], next_epoch["pixel_values"])
    # The generator is a plain function of (seed, epoch, index).
    assert example_rng(7, 1, 3).random() == example_rng(7, 1, 3).random() != example_rng(7, 0, 3).random()


def test_more_masked_plus_replaced_patches_than_exist_fails_at_construction():
    from hf_mim.data import RandomMaskingGenerator, ReplacementPositionGenerator

    with pytest.raises(ValueError, match=r"12 masked plus 5 replaced patches exceed the 16 patches.*--num_replaced"):
        MimDataCollator(BlockwiseMaskingGenerator(4, 12, min_num_patches=2), replacement_generator=ReplacementPositionGenerator(4, 5))
    with pytest.raises(ValueError, match="exceed the 16 patches"):
        MimDataCollator(RandomMaskingGenerator(4, mask_ratio=0.75), replacement_generator=ReplacementPositionGenerator(4, 5))
    # At the limit every patch is either masked or replaced.
    batch = MimDataCollator(RandomMaskingGenerator(4, num_masking_patches=12), replacement_generator=ReplacementPositionGenerator(4, 4))(
        [{"pixel_values": torch.rand(3, 8, 8)}]
    )
    assert (batch["bool_masked_pos"] | batch["bool_replaced_pos"]).all()


def test_epoch_callback_sets_the_dataset_epoch_also_on_resumption():
    from types import SimpleNamespace

    from hf_mim.training.trainer import DatasetEpochCallback

    dataset = SimpleNamespace(epoch=None)
    dataset.set_epoch = lambda epoch: setattr(dataset, "epoch", epoch)
    loader = SimpleNamespace(dataset=dataset)
    for state_epoch, expected in ((None, 0), (0.0, 0), (2.0, 2), (1.5, 1)):  # 1.5: a checkpoint mid-epoch 1
        DatasetEpochCallback().on_epoch_begin(None, SimpleNamespace(epoch=state_epoch), None, train_dataloader=loader)
        assert dataset.epoch == expected


@pytest.mark.parametrize("payload", ["shell", "python"])
@pytest.mark.parametrize("converter", ["beit", "vqkd", "taming"])
def test_converting_a_malicious_pickle_runs_no_code_and_says_why(tmp_path, converter, payload):
    from hf_mim.convert.taming import convert_taming_checkpoint
    from hf_mim.convert.unilm import convert_beit_checkpoint, convert_vqkd_checkpoint

    from test_dvae import _RunsPython, _RunsShellCommand

    convert = {"beit": convert_beit_checkpoint, "vqkd": convert_vqkd_checkpoint, "taming": convert_taming_checkpoint}
    marker, path = tmp_path / "marker", tmp_path / ("last.ckpt" if converter == "taming" else "checkpoint.pth")
    evil = {"shell": _RunsShellCommand, "python": _RunsPython}[payload](marker)
    torch.save({"model": {"w": torch.zeros(1)}, "state_dict": {"w": torch.zeros(1)}, "args": evil}, path)
    with pytest.raises(ValueError, match=r"weights_only=True\) refused.*weights_only=False"):
        convert[converter](path, output_dir=tmp_path / "out")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def _nan_run(tiny_mim_dir, output_dir, skip_nonfinite_steps, **training_kwargs):
    from transformers import AutoModelForMaskedImageModeling, TrainingArguments

    from hf_mim.training.trainer import MimTrainer

    model = AutoModelForMaskedImageModeling.from_pretrained(tiny_mim_dir)
    mask = torch.zeros(16, dtype=torch.bool)
    mask[:6] = True
    # NaN pixels make the ViT's logits, hence the loss, NaN (what a diverging run or a corrupt batch produces).
    examples = [
        {"pixel_values": torch.full((3, 32, 32), float("nan")), "tokenizer_pixel_values": torch.rand(3, 16, 16),
         "bool_masked_pos": mask}
        for _ in range(6)
    ]
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2, weight_decay=0.05,
        use_cpu=True, report_to="none", remove_unused_columns=False, label_names=[], dataloader_num_workers=0,
        **{"logging_steps": 100, "save_strategy": "no", **training_kwargs},
    )
    trainer = MimTrainer(model=model, args=args, train_dataset=examples, data_collator=MimDataCollator(),
                         skip_nonfinite_steps=skip_nonfinite_steps)
    return model, trainer


def test_nonfinite_loss_names_its_step_and_is_skipped_only_on_request(tiny_mim_dir, tmp_path):
    # Without logs or checkpoints in between, the first check is the end of training: before the model is saved.
    model, trainer = _nan_run(tiny_mim_dir, tmp_path / "raise", skip_nonfinite_steps=False)
    with pytest.raises(FloatingPointError, match=r"Non-finite training loss in 3 step\(s\).*between steps 1 and 3.*--skip_nonfinite_steps"):
        trainer.train()
    # A logging step checks the steps since the last check.
    model, trainer = _nan_run(tiny_mim_dir, tmp_path / "log", skip_nonfinite_steps=False, logging_steps=1)
    with pytest.raises(FloatingPointError, match=r"in 1 step\(s\).*between steps 1 and 1"):
        trainer.train()
    # So does a checkpoint, which is never written from weights a non-finite loss has reached.
    model, trainer = _nan_run(tiny_mim_dir, tmp_path / "save", skip_nonfinite_steps=False, save_strategy="steps", save_steps=2)
    with pytest.raises(FloatingPointError, match=r"in 2 step\(s\).*between steps 1 and 2"):
        trainer.train()
    assert not (tmp_path / "save" / "checkpoint-2").exists()

    model, trainer = _nan_run(tiny_mim_dir, tmp_path / "skip", skip_nonfinite_steps=True)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    trainer.train()
    assert trainer.nonfinite_guard.skipped_steps == 3 and trainer.state.global_step == 3
    # The update is dropped whole: no NaN from the gradients, no weight decay, no optimiser state.
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert not trainer.optimizer.state
    # A launch whose every step was skipped trained nothing: the commands fail instead of saving it as trained.
    from hf_mim.training.workflow import require_an_update

    with pytest.raises(FloatingPointError, match=r"every one of the 3 optimiser steps of this launch .* no model"):
        require_an_update(trainer)
    # Nor is a launch that ran no step at all (a loader without a batch) saved as trained.
    trainer.throughput.steps, trainer.nonfinite_guard.skipped_steps = 0, 0
    with pytest.raises(UsageError, match="this launch ran no training step .* no model was saved"):
        require_an_update(trainer)
    with pytest.raises(UsageError, match="no model was saved: ckpt had already reached the end of training at this"):
        require_an_update(trainer, resumed="ckpt")


def test_a_full_batch_per_process_is_required_with_drop_last_unless_processes_split_one():
    from types import SimpleNamespace

    from hf_mim.training.workflow import require_a_full_batch

    trainer = SimpleNamespace(train_dataset=list(range(6)))

    def arguments(split_batches):
        return SimpleNamespace(dataloader_drop_last=True, world_size=2, per_device_train_batch_size=4,
                               accelerator_config=SimpleNamespace(split_batches=split_batches))  # fmt: skip

    with pytest.raises(UsageError, match="6 training images do not fill a batch of --per_device_train_batch_size 4 on "
                                         r"each of 2 process\(es\)"):
        require_a_full_batch(trainer, arguments(split_batches=False))
    require_a_full_batch(trainer, arguments(split_batches=True))  # 4 images are the batch both processes share


def test_a_nonfinite_evaluation_loss_is_counted_on_the_device_and_raised_when_the_evaluation_ends(tiny_mim_dir, tmp_path):
    # Raised per batch, by the one process that saw it, it left the others waiting in the evaluation's collectives.
    model, trainer = _nan_run(tiny_mim_dir, tmp_path, skip_nonfinite_steps=False, per_device_eval_batch_size=2)
    reads = []
    count = trainer.compute_loss.__func__

    def counting(self, *args, **kwargs):
        loss = count(self, *args, **kwargs)
        reads.append(self._nonfinite_eval_losses.device.type)
        return loss

    trainer.compute_loss = counting.__get__(trainer)
    with pytest.raises(FloatingPointError, match=r"Non-finite loss in 3 evaluation batch\(es\) .* at step 0"):
        trainer.evaluate(trainer.train_dataset)
    assert reads == ["cpu"] * 3
    # A finite evaluation afterwards starts from a clean count.
    finite = [{**example, "pixel_values": torch.rand(3, 32, 32)} for example in trainer.train_dataset]
    assert "eval_loss" in trainer.evaluate(finite)


def resumed_weights_equal_uninterrupted(main_function, args, tmp_path, *extra, resumed_extra=()):
    """Train 6 steps straight, and 6 steps resumed from the straight run's step-2 checkpoint (with `resumed_extra`
    flags too): bitwise equal weights."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    steps = ("--max_steps", "6", "--save_steps", "2", "--seed", "3", *extra)
    main_function([*args, "--output_dir", str(straight), *steps])
    main_function([*args, "--output_dir", str(resumed), *steps, *resumed_extra,
                   "--resume_from_checkpoint", str(straight / "checkpoint-2")])  # fmt: skip
    expected, actual = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert expected.keys() == actual.keys()
    return [name for name in expected if not torch.equal(expected[name], actual[name])]


def test_a_resumed_dvae_training_ends_with_the_weights_of_an_uninterrupted_one(image_folder, tmp_path):
    # The views were drawn from torch's global RNG, which the resumed run had consumed differently.
    from hf_mim.training import train_tokenizer

    args = [
        "--tokenizer_type", "dvae", "--train_dir", image_folder, "--do_train", "--per_device_train_batch_size", "4",
        "--learning_rate", "1e-3", "--report_to", "none", "--use_cpu", "--dataloader_num_workers", "0",
        "--config_overrides", "image_size=32,hidden_size=16,codebook_size=64,num_groups=2,decoder_hidden_size=16",
        "--color_jitter", "0.4",
    ]  # fmt: skip
    assert resumed_weights_equal_uninterrupted(
        train_tokenizer.main, args, tmp_path, resumed_extra=("--crop_min_scale", "0.08")
    ) == []


def test_a_resumed_fine_tuning_with_mixup_ends_with_the_weights_of_an_uninterrupted_one(
    tiny_mim_dir, image_folder, tmp_path
):
    # Augmentations and Mixup/CutMix came from torch's global RNG; two micro-batches per step mix differently.
    from hf_mim.training.run_image_classification import main as finetune

    args = [
        "--model_name_or_path", tiny_mim_dir, "--train_dir", image_folder, "--do_train",
        "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--mixup", "0.8", "--cutmix", "1.0",
        "--report_to", "none", "--use_cpu", "--dataloader_num_workers", "0", "--drop_path_rate", "0.1",
    ]  # fmt: skip
    # The resumed launch spells out the recipe's view defaults, which were refused as changes from "unset".
    spelled_out = ("--color_jitter", "0", "--crop_min_scale", "0.08")  # none under its default RandAugment
    assert resumed_weights_equal_uninterrupted(
        finetune, args, tmp_path, "--gradient_accumulation_steps", "2", resumed_extra=spelled_out
    ) == []


def test_the_best_checkpoint_of_a_stock_beit_is_loaded_whole_and_one_that_does_not_fit_is_refused(tmp_path):
    # transformers 5 saves a stock BEiT under its old layer names; Trainer's strict=False load then loaded nothing.
    from transformers import BeitConfig, BeitForImageClassification

    from hf_mim.training.arguments import MimTrainingArguments
    from hf_mim.checkpoint_folder import checkpoint_weight_names
    from hf_mim.training.trainer import MimTrainer

    def classifier(layers, seed):
        torch.manual_seed(seed)
        config = BeitConfig(hidden_size=16, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=32,
                            image_size=16, patch_size=8, use_relative_position_bias=True, num_labels=2)  # fmt: skip
        return BeitForImageClassification(config)

    classifier(1, seed=1).save_pretrained(tmp_path / "best")
    assert checkpoint_weight_names(tmp_path / "best") != set(classifier(1, seed=1).state_dict())
    model = classifier(1, seed=2)
    args = MimTrainingArguments(output_dir=str(tmp_path / "run"), report_to="none", use_cpu=True)
    trainer = MimTrainer(model=model, args=args)
    trainer.state.best_model_checkpoint = str(tmp_path / "best")
    trainer._load_best_model()
    expected = BeitForImageClassification.from_pretrained(tmp_path / "best").state_dict()
    assert all(torch.equal(value, expected[name]) for name, value in model.state_dict().items())

    classifier(2, seed=1).save_pretrained(tmp_path / "deeper")
    with pytest.raises(UsageError, match=r"deeper do not fit the model being trained .* another --output_dir"):
        trainer._load_from_checkpoint(str(tmp_path / "deeper"))


@pytest.fixture(scope="module")
def checkpointed_run(tiny_dvae_dir, image_folder, tmp_path_factory):
    """A tiny BEiT pre-training of 2 steps with a checkpoint at step 1, as (its output_dir, its flags)."""
    output_dir = tmp_path_factory.mktemp("checkpointed")
    main(run_mim_args(tiny_dvae_dir, image_folder, output_dir, "--max_steps", "2", "--save_steps", "1"))
    return output_dir


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--learning_rate", "5e-3"], '--learning_rate 0.001 (this launch: 0.005)'),
        (["--seed", "9", "--color_jitter", "0"], '--color_jitter 0.4 (this launch: 0.0), --seed 0 (this launch: 9)'),
        # The default of 75 of 196 patches scaled to the 4x4 grid: 6.
        (["--num_mask_patches", "5"], "--num_mask_patches 6 (this launch: 5)"),
        (["--per_device_train_batch_size", "2"], "--per_device_train_batch_size 4 (this launch: 2)"),
    ],
)
def test_a_run_resumed_with_other_flags_that_decide_it_is_refused_naming_them(
    checkpointed_run, tiny_dvae_dir, image_folder, tmp_path, flags, named
):
    # Trainer resumed them silently: the checkpoint's optimiser and schedule with this launch's data and rates.
    assert json.loads((checkpointed_run / "checkpoint-1" / "hf_mim_run.json").read_text())["flags"]["seed"] == 0
    args = run_mim_args(tiny_dvae_dir, image_folder, tmp_path, "--max_steps", "2",
                        "--resume_from_checkpoint", str(checkpointed_run / "checkpoint-1"), *flags)  # fmt: skip
    fix = "relaunch with the checkpoint's, or drop --resume_from_checkpoint to start afresh (in another --output_dir)"
    with pytest.raises(UsageError, match=rf"checkpoint-1 was trained with {re.escape(named)}; .*: {re.escape(fix)}"):
        main(args)
    # Where the data lives, how often to log or save, and how long to train may change; the defaults the
    # checkpoint was trained with may be spelled out (they were refused as changes from "unset").
    moved = tmp_path / "moved_images"
    shutil.copytree(image_folder, moved)
    defaults = ["--color_jitter", "0.4", "--crop_min_scale", "0.08", "--num_mask_patches", "6",
                "--min_mask_patches_per_block", "1"]  # fmt: skip
    main(run_mim_args(tiny_dvae_dir, str(moved), tmp_path, "--max_steps", "3", "--logging_steps", "2",
                      "--resume_from_checkpoint", str(checkpointed_run / "checkpoint-1"), *defaults))  # fmt: skip


def test_each_checkpoints_run_record_is_written_before_trainer_saves_and_pushes_it(
    tiny_dvae_dir, image_folder, tmp_path, monkeypatch
):
    # It was written by an on_save callback, which runs after Trainer pushed the checkpoint (hub_strategy
    # "checkpoint"): the Hub's copy lacked it, and a resumption from it could not check the flags.
    from hf_mim.training.trainer import MimTrainer

    found = {}
    save_model = MimTrainer.save_model

    def recording(self, output_dir=None, _internal_call=False):
        if output_dir is not None and "checkpoint-" in str(output_dir):
            found[os.path.basename(output_dir)] = sorted(os.listdir(output_dir))
        return save_model(self, output_dir, _internal_call=_internal_call)

    monkeypatch.setattr(MimTrainer, "save_model", recording)
    main(run_mim_args(tiny_dvae_dir, image_folder, tmp_path, "--max_steps", "2", "--save_steps", "1"))
    # With the tokenizer view and its code, also written before the save.
    written = ["hf_mim_run.json", "image_processing_dvae.py", "image_processing_mim.py", "tokenizer"]
    assert found == {"checkpoint-1": written, "checkpoint-2": written}
    record = json.loads((tmp_path / "checkpoint-2" / "hf_mim_run.json").read_text())
    assert record["flags"]["seed"] == 0 and record["train_skipped_images"] == 0


def test_a_run_resumed_with_another_image_processor_is_refused(checkpointed_run, tiny_dvae_dir, image_folder, tmp_path):
    # The ViT's view (normalisation, resampling) comes from a path, which was not compared: another processor there
    # changed the inputs mid-run silently. Its settings are recorded; the same settings at another path resume.
    side = {"height": 32, "width": 32}
    MimImageProcessor(size=side, crop_size=side).save_pretrained(tmp_path / "same")
    MimImageProcessor(size=side, crop_size=side, image_mean=[0.5] * 3).save_pretrained(tmp_path / "other")

    def resumed(processor):
        return run_mim_args(tiny_dvae_dir, image_folder, tmp_path / processor, "--max_steps", "2",
                            "--image_processor_name", str(tmp_path / processor),
                            "--resume_from_checkpoint", str(checkpointed_run / "checkpoint-1"))  # fmt: skip

    with pytest.raises(UsageError, match=r"checkpoint-1 was trained with --image_processor_name \"settings [0-9a-f]{16}\""):
        main(resumed("other"))
    main(resumed("same"))


def test_a_run_resumed_with_another_tokenizer_is_refused(checkpointed_run, image_folder, tmp_path):
    # The checkpoint's tokenizer weights were loaded over the new one: the run went on with the old targets.
    from conftest import tiny_dvae_config

    from hf_mim import DvaeImageProcessor, DvaeModel

    torch.manual_seed(5)
    DvaeModel(tiny_dvae_config()).save_pretrained(tmp_path / "other_dvae")
    DvaeImageProcessor(size={"height": 16, "width": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(
        tmp_path / "other_dvae"
    )
    args = run_mim_args(str(tmp_path / "other_dvae"), image_folder, tmp_path / "out", "--max_steps", "2",
                        "--resume_from_checkpoint", str(checkpointed_run / "checkpoint-1"))  # fmt: skip
    with pytest.raises(UsageError, match="checkpoint-1 was trained with another tokenizer than this run's"):
        main(args)


def test_a_run_resumed_by_another_number_of_processes_is_refused(tmp_path):
    from hf_mim.training.workflow import check_run_flags

    (tmp_path / "hf_mim_run.json").write_text(json.dumps({"flags": {"num_processes": 2, "seed": 0}}))
    check_run_flags(str(tmp_path), {"num_processes": 2, "seed": 0, "new_flag": 1}, "start afresh")
    with pytest.raises(UsageError, match=r"trained with 2 processes \(this launch: 1; the launcher's setting\); .*"
                                         r"relaunch with the checkpoint's, or start afresh$"):
        check_run_flags(str(tmp_path), {"num_processes": 1, "seed": 0}, "start afresh")


def test_a_record_of_an_older_hf_mim_with_unset_view_and_masking_defaults_resumes(tmp_path):
    # Records written before runs recorded their resolved defaults hold None for them; the launch resolves the same
    # defaults, so refusing "unset (this launch: 0.4)" left no way to resume.
    from hf_mim.training.workflow import check_run_flags

    older = {"color_jitter": None, "crop_min_scale": None, "num_mask_patches": None, "min_mask_patches_per_block": None,
             "max_mask_patches_per_block": None, "seed": 0}  # fmt: skip
    (tmp_path / "hf_mim_run.json").write_text(json.dumps({"flags": older}))
    resolved = {"color_jitter": 0.4, "crop_min_scale": 0.08, "num_mask_patches": 6, "min_mask_patches_per_block": 1,
                "max_mask_patches_per_block": None, "seed": 0}  # fmt: skip
    check_run_flags(str(tmp_path), resolved, "start afresh")
    # A flag that stays unset when unset is still compared.
    with pytest.raises(UsageError, match=r"--max_mask_patches_per_block unset \(this launch: 5\)"):
        check_run_flags(str(tmp_path), {**resolved, "max_mask_patches_per_block": 5}, "start afresh")


def test_the_same_command_launched_after_its_run_ended_trains_no_step_past_the_end(
    checkpointed_run, tiny_dvae_dir, image_folder, tmp_path
):
    # Trainer resumed the last checkpoint, ran a third step of a 2-step run and saved it as the run's.
    args = run_mim_args(tiny_dvae_dir, image_folder, checkpointed_run, "--max_steps", "2", "--save_steps", "1")
    fix = ("raise --max_steps to train on, drop --do_train to evaluate only, or start afresh with --overwrite_output_dir "
           "(or another --output_dir)")
    with pytest.raises(UsageError, match=rf"checkpoint-2 has already trained to --max_steps 2 \(step 2, epoch [\d.]+\): "
                                         rf"nothing is left to train; {re.escape(fix)}"):
        main(args)
    assert not (checkpointed_run / "checkpoint-3").exists()
    # Its last checkpoint may be short of the end (a --save_steps that does not divide --max_steps): the run's own
    # final state in --output_dir says it ended, and training its tail again would replace the final model.
    short = tmp_path / "short"
    shutil.copytree(checkpointed_run, short, ignore=shutil.ignore_patterns("checkpoint-2"))
    with pytest.raises(UsageError, match=rf"The run in {re.escape(str(short))} has already trained to --max_steps 2 "
                                         r"\(step 2"):
        main(run_mim_args(tiny_dvae_dir, image_folder, short, "--max_steps", "2", "--save_steps", "1"))
    # An epoch-long run ends where its epochs do (2 steps of 4 of the 24 images are a third of an epoch).
    epochs = run_mim_args(tiny_dvae_dir, image_folder, checkpointed_run, "--num_train_epochs", "0.3")
    with pytest.raises(UsageError, match=r"checkpoint-2 has already trained to --num_train_epochs 0.3 \(step 2, "
                                         r"epoch 0.3+\d*\): nothing is left to train; raise --num_train_epochs"):
        main(epochs)


def test_overwrite_output_dir_removes_the_earlier_runs_checkpoints_so_no_later_launch_resumes_them(
    checkpointed_run, tiny_dvae_dir, image_folder, tmp_path, caplog
):
    # The earlier run left checkpoint-1, checkpoint-2 and its final state; the new one is interrupted after step 1.
    folder = tmp_path / "run"
    shutil.copytree(checkpointed_run, folder)
    (folder / "notes").mkdir()
    # Its results and card, which the new run's would have kept (transformers merges results; the card reuses them).
    (folder / "all_results.json").write_text(json.dumps({"eval_knn_accuracy": 0.9}))
    (folder / "README.md").write_text("the earlier run's card")
    with caplog.at_level("WARNING", logger="hf_mim.training.workflow"):
        main(run_mim_args(tiny_dvae_dir, image_folder, folder, "--overwrite_output_dir", "--max_steps", "1",
                          "--save_steps", "1"))  # fmt: skip
    assert "removing the 2 checkpoint(s) of an earlier run" in caplog.text and "checkpoint-1, checkpoint-2" in caplog.text
    assert sorted(path.name for path in folder.glob("checkpoint-*")) == ["checkpoint-1"]
    assert json.loads((folder / "trainer_state.json").read_text())["global_step"] == 1
    assert (folder / "notes").is_dir()  # not a checkpoint: left alone
    assert "eval_knn_accuracy" not in json.loads((folder / "all_results.json").read_text())
    assert "the earlier run's card" not in (folder / "README.md").read_text()
    # Launched again without the flag to carry on, it resumes this run's step 1: the earlier run's checkpoint-2 (and
    # final state), kept, were taken for this run's end.
    caplog.clear()
    with caplog.at_level("WARNING", logger="hf_mim.training.workflow"):
        main(run_mim_args(tiny_dvae_dir, image_folder, folder, "--max_steps", "2", "--save_steps", "1"))
    assert f"Resuming training from {folder / 'checkpoint-1'}" in caplog.text
    assert json.loads((folder / "trainer_state.json").read_text())["global_step"] == 2


def test_every_checkpoint_holds_the_tokenizer_view_so_it_continues_and_pushes_as_the_final_model(
    checkpointed_run, tiny_dvae_dir, image_folder, tmp_path
):
    # checkpoint-<step> folders lacked tokenizer/: continuing one was a traceback, pushing one uploaded a repo whose
    # documented subfolder="tokenizer" load failed.
    from hf_mim.checkpoint_folder import load_tokenizer_image_processor
    from hf_mim.hub.push import main as push
    from hf_mim.models import DvaeImageProcessor

    checkpoint = checkpointed_run / "checkpoint-1"
    assert isinstance(load_tokenizer_image_processor(str(checkpoint)), DvaeImageProcessor)
    assert (checkpoint / "image_processing_dvae.py").is_file()
    push([str(checkpoint), "--repo_id", "tester/tiny", "--dry_run", str(tmp_path / "upload")])
    assert (tmp_path / "upload" / "tokenizer" / "preprocessor_config.json").is_file()
    continued = [
        "--train_dir", image_folder, "--output_dir", str(tmp_path / "continued"), "--do_train", "--max_steps", "1",
        "--per_device_train_batch_size", "4", "--use_cpu", "--report_to", "none", "--dataloader_num_workers", "0",
    ]  # fmt: skip
    main([*continued, "--model_name_or_path", str(checkpoint)])
    # A checkpoint of an older hf_mim, without the view: one line each, naming the folder and what to pass.
    older = tmp_path / "older"
    shutil.copytree(checkpoint, older, ignore=shutil.ignore_patterns("tokenizer"))
    continued[continued.index("--output_dir") + 1] = str(tmp_path / "continued_older")
    with pytest.raises(UsageError, match=rf"--model_name_or_path {re.escape(str(older))} has no "
                                         r"tokenizer/preprocessor_config.json; to continue that run pass it as "
                                         r"--resume_from_checkpoint, or pass the run's --output_dir"):
        main([*continued, "--model_name_or_path", str(older)])
    with pytest.raises(UsageError, match=r"is a MIM checkpoint without its tokenizer view .* push the run's --output_dir"):
        push([str(older), "--repo_id", "tester/tiny", "--dry_run", str(tmp_path / "upload_older")])


def test_a_resumed_run_of_another_length_is_warned_that_its_schedule_is_rebuilt(
    checkpointed_run, tiny_dvae_dir, image_folder, tmp_path, caplog
):
    args = run_mim_args(tiny_dvae_dir, image_folder, tmp_path, "--max_steps", "4",
                        "--resume_from_checkpoint", str(checkpointed_run / "checkpoint-1"))  # fmt: skip
    with caplog.at_level("WARNING", logger="hf_mim.training.workflow"):
        main(args)
    assert "checkpoint-1 was planned for 2 steps and this launch for 4: the linear learning-rate schedule" in caplog.text


def test_counts_summed_over_processes_stay_exact_beyond_float32s_integers(tmp_path):
    # ImageNet x 300 epochs: the float32 sum logged (and carded) 384,350,112 samples for 384,350,100.
    from transformers import BeitConfig, BeitForImageClassification

    from hf_mim.training.arguments import MimTrainingArguments
    from hf_mim.training.trainer import MimTrainer

    config = BeitConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, image_size=16,
                        patch_size=8, num_labels=2)  # fmt: skip
    args = MimTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    trainer = MimTrainer(model=BeitForImageClassification(config), args=args)
    assert trainer.summed_over_processes(384_350_100, 0, 2**53 + 1) == [384_350_100, 0, 2**53 + 1]


def test_the_stand_in_of_an_undecodable_batch_is_a_decodable_example_and_is_not_counted_again():
    from hf_mim.data import SkippedImageCounter
    from hf_mim.training.trainer import MimTrainer

    trainer = MimTrainer.__new__(MimTrainer)
    trainer.train_dataset = [None, None, "good", None]
    trainer.data_collator = lambda examples: {} if examples[0] is None else {"example": examples[0]}
    trainer._stand_in_index, trainer.data_flag = {"train": 0, "eval": 0}, "--dataset_name"
    trainer.skipped_images, trainer.eval_skipped_images = SkippedImageCounter(), SkippedImageCounter()
    trainer.skipped_images.increment(3)  # the three were counted when their batches were drawn
    assert trainer._stand_in_batch("train") == {"example": "good"} and trainer._stand_in_index["train"] == 2
    assert trainer.skipped_images.value == 1  # the two looked past are taken back out (the real decode counts them)
    # Evaluation looks in the set being evaluated and takes back from its own count.
    trainer._evaluated_dataset = [None, "valid"]
    trainer.eval_skipped_images.increment(1)
    assert trainer._stand_in_batch("eval") == {"example": "valid"} and trainer._stand_in_index["eval"] == 1
    assert trainer.eval_skipped_images.value == 0 and trainer.skipped_images.value == 1
    trainer.train_dataset = [None, None]
    with pytest.raises(UsageError, match="no training image could be decoded .*: point --dataset_name at your images"):
        trainer._stand_in_batch("train")
    trainer._evaluated_dataset = [None]
    with pytest.raises(UsageError, match="no validation image could be decoded"):
        trainer._stand_in_batch("eval")


def test_an_evaluation_batch_of_several_processes_keeps_its_sampled_positions():
    from hf_mim.training.trainer import DECODED, DecodedPositionsCollator, in_sampled_positions

    collate = DecodedPositionsCollator(MimDataCollator())
    image = {"pixel_values": torch.ones(3, 2, 2), "labels": 1}
    batch = collate([image, None, {"pixel_values": None, "labels": 0}, {**image, "labels": 0}])
    assert batch[DECODED] == (True, False, False, True) and batch["labels"].tolist() == [1, 0]
    assert collate([None]) == {DECODED: (False,)}
    # Predictions of the decoded rows go back to their positions; padding elsewhere (-100: Trainer's for labels).
    logits, labels = in_sampled_positions((torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([1, 0])), [0, 3], 4, -100)
    assert logits.tolist() == [[1, 2], [-100, -100], [-100, -100], [3, 4]] and labels.tolist() == [1, -100, -100, 0]
    # A stand-in's predictions give the shapes only.
    assert torch.equal(in_sampled_positions(torch.ones(1, 5), [], 3, 0), torch.zeros(3, 5))
    # The positions are copied to the predictions' device (a CPU index meeting meta predictions would fail here).
    padded = in_sampled_positions(torch.empty(2, 5, device="meta"), [1, 2], 4, 0)
    assert padded.device.type == "meta" and padded.shape == (4, 5)


@pytest.mark.parametrize(
    ("remainder", "end_of_dataloader", "first_repeats"),
    [
        (3, True, [2, 1]),  # 7 images, 2 processes x 2: the last batches hold images 4, 5 | 6, then image 0 again
        (1, True, [1, 0]),  # 9 images: 8 | image 0, then 1 and 2 again
        (0, True, [2, 2]),  # 8 images: no repeat
        (-1, True, [2, 2]),  # a set of unknown length: accelerate cannot tell the repeats either
        (3, False, [2, 2]),  # not the last batch
    ],
)
def test_the_repeats_filling_the_last_evaluation_batches_are_found(remainder, end_of_dataloader, first_repeats):
    from types import SimpleNamespace

    from hf_mim.training.trainer import MimTrainer

    state = SimpleNamespace(end_of_dataloader=end_of_dataloader, remainder=remainder)
    found = [
        MimTrainer._first_repeat(SimpleNamespace(accelerator=SimpleNamespace(gradient_state=state, process_index=rank)), 2)
        for rank in (0, 1)
    ]
    assert found == first_repeats


@pytest.mark.parametrize(
    ("processes", "dataset", "dispatch_batches", "wrapped"),
    [
        (2, [1, 2, 3], None, True),
        (1, [1, 2, 3], None, False),
        (2, iter([1, 2, 3]), None, False),  # a stream: dispatched by accelerate, which concatenates tensors only
        (2, [1, 2, 3], True, False),
    ],
)
def test_only_sharded_evaluation_batches_say_which_examples_were_decodable(processes, dataset, dispatch_batches, wrapped):
    from types import SimpleNamespace

    from hf_mim.training.trainer import DecodedPositionsCollator, MimTrainer

    collator = MimDataCollator()
    trainer = SimpleNamespace(
        accelerator=SimpleNamespace(num_processes=processes, dispatch_batches=dispatch_batches), data_collator=collator
    )
    used = MimTrainer._with_decoded_positions(trainer, dataset, lambda: trainer.data_collator)
    assert isinstance(used, DecodedPositionsCollator) == wrapped and trainer.data_collator is collator
    assert trainer._evaluated_dataset is dataset


def test_predictions_go_through_the_same_positions_as_evaluation(tmp_path, monkeypatch):
    from transformers import BeitConfig, BeitForImageClassification

    from hf_mim.training.arguments import MimTrainingArguments
    from hf_mim.training.trainer import MimTrainer

    config = BeitConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, image_size=16,
                        patch_size=8, num_labels=2)  # fmt: skip
    trainer = MimTrainer(model=BeitForImageClassification(config), args=MimTrainingArguments(
        output_dir=str(tmp_path), report_to="none", use_cpu=True))  # fmt: skip
    seen = []
    monkeypatch.setattr(MimTrainer, "_with_decoded_positions", lambda self, dataset, make: seen.append(dataset))
    trainer.get_test_dataloader([1])
    trainer.get_eval_dataloader([2])
    assert seen == [[1], [2]]


def test_evaluation_metrics_weigh_each_batch_by_its_examples(tiny_mim_dir, tmp_path):
    # 5 images in batches of 2, 2 and 1: the last batch's accuracy is one image's, not worth a full batch's.
    from transformers import AutoModelForMaskedImageModeling, TrainingArguments

    from hf_mim.training.trainer import MimTrainer

    model = AutoModelForMaskedImageModeling.from_pretrained(tiny_mim_dir).eval()
    mask = torch.zeros(16, dtype=torch.bool)
    mask[:8] = True
    generator = torch.Generator().manual_seed(3)
    examples = [
        {"pixel_values": torch.rand(3, 32, 32, generator=generator), "bool_masked_pos": mask,
         "tokenizer_pixel_values": torch.rand(3, 16, 16, generator=generator)}
        for _ in range(5)
    ]  # fmt: skip
    with torch.no_grad():
        # The head predicts the tokenizer's most frequent masked token whatever it sees: each image's accuracy is
        # the share of its masked patches with that token (random weights would score 0 everywhere).
        ids = model.tokenizer.get_codebook_indices(torch.stack([e["tokenizer_pixel_values"] for e in examples]))
        model.lm_head.weight.zero_()
        model.lm_head.bias.zero_()
        model.lm_head.bias[ids[:, mask].flatten().mode().values] = 1.0
        accuracies = [model(**MimDataCollator()([example])).masked_accuracy.item() for example in examples]
    batch_means = [sum(accuracies[:2]) / 2, sum(accuracies[2:4]) / 2, accuracies[4]]
    # Every image has 8 masked patches, so the accuracy over all of them is the mean of the images'.
    expected = sum(accuracies) / 5
    assert sum(batch_means) / 3 != pytest.approx(expected)  # the images differ enough to tell the two apart
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_eval_batch_size=2, use_cpu=True, report_to="none",
        remove_unused_columns=False, label_names=[], dataloader_num_workers=0,
    )  # fmt: skip
    trainer = MimTrainer(model=model, args=args, data_collator=MimDataCollator())
    metrics = trainer.evaluate(examples)
    assert metrics["eval_masked_accuracy"] == pytest.approx(expected, rel=1e-6)
