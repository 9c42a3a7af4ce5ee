"""Fine-tuning: Mixup/CutMix targets, the classifier built from a MIM checkpoint, layer decay, and the script."""

import json
import pathlib

import numpy as np
import pytest
import torch
from transformers import BeitForImageClassification, TrainingArguments

from conftest import two_process_evaluations, write_images

from hf_mim import BeitMimForMaskedImageModeling
from hf_mim.training.mixup import MixupCutmix, cutmix_box, smooth_one_hot, soft_target_cross_entropy
from hf_mim.training.run_image_classification import ImageClassificationTrainer, ModelArguments, build_classifier, main


def test_label_smoothing_matches_torch():
    logits, labels = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0])
    targets = smooth_one_hot(labels, 5, 0.1)
    assert torch.allclose(targets.sum(1), torch.ones(6)) and targets[0, 0] == pytest.approx(0.92)
    expected = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)
    torch.testing.assert_close(soft_target_cross_entropy(logits, targets), expected)
    torch.testing.assert_close(soft_target_cross_entropy(logits, labels), torch.nn.functional.cross_entropy(logits, labels))


def test_mixup_blends_images_and_targets():
    pixels, labels = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    mixup = MixupCutmix(4, mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.0)
    mixed, targets = mixup(pixels, labels, rng=np.random.default_rng(0))
    lam = targets[0, 0].item()
    assert 0 < lam < 1 and targets[0, 3].item() == pytest.approx(1 - lam)
    torch.testing.assert_close(mixed, lam * pixels + (1 - lam) * pixels.flip(0))


def test_cutmix_targets_follow_the_pasted_area():
    pixels, labels = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    mixup = MixupCutmix(4, mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0)
    mixed, targets = mixup(pixels, labels, rng=np.random.default_rng(3))
    from_partner = (mixed[0] != pixels[0]).any(0).float().mean().item()
    assert 0 < from_partner < 1
    assert targets[0, 3].item() == pytest.approx(from_partner) and targets[0, 0].item() == pytest.approx(1 - from_partner)
    top, bottom, left, right = cutmix_box(16, 16, 0.75, np.random.default_rng(0))
    assert 0 <= top <= bottom <= 16 and 0 <= left <= right <= 16


def test_no_mixing_is_label_smoothing_only():
    pixels, labels = torch.rand(2, 3, 8, 8), torch.tensor([1, 0])
    mixed, targets = MixupCutmix(3, mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.3)(pixels, labels)
    assert torch.equal(mixed, pixels) and torch.allclose(targets, smooth_one_hot(labels, 3, 0.3))
    with pytest.raises(ValueError, match="label_smoothing"):
        MixupCutmix(3, label_smoothing=1.5)


def test_classifier_from_a_mim_checkpoint(tiny_mim_dir):
    source = BeitMimForMaskedImageModeling.from_pretrained(tiny_mim_dir)
    model = build_classifier(source, ModelArguments(tiny_mim_dir, drop_path_rate=0.2, head_init_scale=0.001), ["cat", "dog", "fox"])
    assert type(model) is BeitForImageClassification and model.config.model_type == "beit"
    assert model.config.id2label == {0: "cat", 1: "dog", 2: "fox"} and model.config.drop_path_rate == 0.2
    shared = source.beit.shared_position_bias.relative_position_bias_table
    assert model.beit.shared_position_bias is None
    for layer in model.beit.layers:
        assert torch.equal(layer.relative_position_bias.relative_position_bias_table, shared)
    assert torch.equal(model.beit.layers[1].mlp.fc2.weight, source.beit.layers[1].mlp.fc2.weight)
    assert model.beit.embeddings.mask_token is None
    assert model.classifier.weight.abs().max() < 0.001


def test_layer_decay_reaches_the_optimizer(tiny_mim_dir, tmp_path):
    model = build_classifier(BeitMimForMaskedImageModeling.from_pretrained(tiny_mim_dir), ModelArguments(tiny_mim_dir), ["a", "b"])
    args = TrainingArguments(str(tmp_path), learning_rate=1.0, weight_decay=0.05, use_cpu=True, report_to="none")
    optimizer = ImageClassificationTrainer(model=model, args=args, layer_decay=0.5).create_optimizer()
    rates = {name: group["lr"] for group in optimizer.param_groups for name in group["names"]}
    # Two layers: embeddings 0.5^3, layer i 0.5^(2 - i), pooler and classifier 1.
    assert rates["beit.embeddings.cls_token"] == pytest.approx(0.125)
    assert rates["beit.layers.0.relative_position_bias.relative_position_bias_table"] == pytest.approx(0.25)
    assert rates["beit.layers.1.attention.q_proj.weight"] == pytest.approx(0.5)
    assert rates["classifier.weight"] == rates["beit.pooler.layernorm.weight"] == pytest.approx(1.0)


def test_script_fine_tunes_and_saves_a_stock_classifier(tiny_mim_dir, image_folder, tmp_path, caplog):
    metrics = main([
        "--model_name_or_path", tiny_mim_dir, "--train_dir", image_folder, "--train_val_split", "0.25",
        "--output_dir", str(tmp_path), "--do_train", "--do_eval", "--max_steps", "3",
        "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--mixup", "0.8", "--cutmix", "1.0",
        "--logging_steps", "1", "--save_strategy", "no", "--use_cpu", "--report_to", "none",
        "--dataloader_num_workers", "0", "--seed", "0", "--eval_strategy", "steps", "--eval_steps", "1",
    ])
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and np.isfinite(metrics["eval_loss"])
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry] == [1, 2, 3]
    # BEiT reports the best accuracy over its evaluations: beside the last one, with its step.
    # (trainer_state.json is saved after training, before the final evaluation.)
    evaluated = [entry["eval_accuracy"] for entry in state["log_history"] if "eval_accuracy" in entry]
    assert len(evaluated) == 3 and metrics["eval_best_accuracy"] == max([*evaluated, metrics["eval_accuracy"]])
    assert metrics["eval_best_accuracy_step"] in (1, 2, 3)
    assert json.loads((tmp_path / "all_results.json").read_text())["eval_best_accuracy"] == metrics["eval_best_accuracy"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "beit" and "auto_map" not in config and config["use_relative_position_bias"]
    assert config["id2label"] == {"0": "a", "1": "b"}
    processor = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert processor["image_processor_type"] == "BeitImageProcessor"
    # BEiT's evaluation view, which the reported accuracy used: shorter side to floor(32 / (224 / 256)), centre crop.
    assert processor["do_center_crop"] and processor["size"] == {"shortest_edge": 36}
    assert processor["crop_size"] == {"height": 32, "width": 32}
    _, info = BeitForImageClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    # Fine-tuned again, its head is replaced: said, not only in transformers' report of unexpected weights.
    with caplog.at_level("WARNING", logger="hf_mim.training.run_image_classification"):
        main(["--model_name_or_path", str(tmp_path), "--train_dir", image_folder, "--output_dir", str(tmp_path / "again"),
              "--do_train", "--max_steps", "1", "--per_device_train_batch_size", "4", "--save_strategy", "no",
              "--use_cpu", "--report_to", "none", "--dataloader_num_workers", "0"])  # fmt: skip
    assert f"{tmp_path} is an image classifier (BeitForImageClassification, 2 classes): its encoder is fine-tuned " \
        "with a new head for the 2 classes here; its own head is not used" in caplog.text


@pytest.mark.slow
def test_undecodable_validation_images_change_only_the_skipped_count_under_two_processes(tiny_mim_dir, tmp_path):
    # 6 photos, batches of 2, and 3 broken files: the first evaluation batch keeps one image, a later one none, the
    # last repeats the set's first images (accelerate's padding, a broken one among them). Processes gathered
    # predictions of different lengths (gloo aborted) or none at all (a hang), and the repeat counted twice.
    write_images(tmp_path / "train", 8)
    script = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "run_image_classification.py"
    args = ["--model_name_or_path", tiny_mim_dir, "--train_dir", tmp_path / "train", "--do_train", "--do_eval",
            "--max_steps", "2", "--learning_rate", "1e-3", "--per_device_train_batch_size", "2",
            "--per_device_eval_batch_size", "2", "--save_strategy", "no", "--use_cpu", "--report_to", "none",
            "--dataloader_num_workers", "0", "--seed", "0"]  # fmt: skip
    # Sorted second, eighth and ninth.
    without, with_broken = two_process_evaluations(
        tmp_path, script, lambda validation, output: [*args, "--validation_dir", validation, "--output_dir", output],
        ["a/0000z.png", "b/zz0.png", "b/zz1.png"],
    )
    assert with_broken["eval_skipped_images"] == 3 and without["eval_skipped_images"] == 0
    # The same 6 images, each scored once: the same model (the training images did not change), the same metrics.
    assert with_broken["eval_accuracy"] == without["eval_accuracy"]
    assert round(without["eval_accuracy"] * 6, 6) == round(without["eval_accuracy"] * 6)
    assert with_broken["eval_loss"] == pytest.approx(without["eval_loss"], rel=1e-6)


def test_accuracy_leaves_out_the_positions_of_undecodable_images():
    from transformers import EvalPrediction

    from hf_mim.evaluation.metrics import load_metric
    from hf_mim.training.run_image_classification import accuracy_of

    prediction = EvalPrediction(predictions=np.array([0, 1, 0, 1]), label_ids=np.array([0, -100, 1, 1]))
    assert accuracy_of(load_metric("accuracy"), prediction)["accuracy"] == pytest.approx(2 / 3)


def test_image_size_mismatch_is_an_error(tiny_mim_dir, image_folder, tmp_path):
    from transformers import BeitImageProcessorPil

    BeitImageProcessorPil(size={"height": 48, "width": 48}).save_pretrained(tmp_path / "processor")
    with pytest.raises(ValueError, match="48x48 images but the model takes 32x32"):
        main(["--model_name_or_path", tiny_mim_dir, "--image_processor_name", str(tmp_path / "processor"),
              "--train_dir", image_folder, "--output_dir", str(tmp_path / "out"), "--do_train", "--use_cpu"])


FINE_TUNE_FLAGS = ["--do_train", "--max_steps", "1", "--per_device_train_batch_size", "4", "--save_strategy", "no",
                   "--use_cpu", "--report_to", "none", "--dataloader_num_workers", "0", "--seed", "0"]  # fmt: skip


def record_train_transforms(monkeypatch):
    """The keyword arguments of every training-view `TwoViewTransform` the script builds."""
    from hf_mim.training import run_image_classification

    built = []

    def recording(view, **kwargs):
        if kwargs.get("train", True):
            built.append(kwargs)
        return run_image_classification.TwoViewTransform.__wrapped__(view, **kwargs)

    recording.__wrapped__ = run_image_classification.TwoViewTransform
    monkeypatch.setattr(run_image_classification, "TwoViewTransform", recording)
    return built


def test_training_view_follows_the_beit_recipe_by_default(tiny_mim_dir, image_folder, tmp_path, monkeypatch):
    built = record_train_transforms(monkeypatch)
    main(["--model_name_or_path", tiny_mim_dir, "--train_dir", image_folder, "--output_dir", str(tmp_path / "a"), *FINE_TUNE_FLAGS])
    # RandAugment replaces colour jitter, as in timm's transform factory.
    assert built[-1]["rand_augment"] == "rand-m9-mstd0.5-inc1" and built[-1]["random_erasing"] == 0.25
    assert built[-1]["color_jitter"] == 0.0
    main(["--model_name_or_path", tiny_mim_dir, "--train_dir", image_folder, "--output_dir", str(tmp_path / "b"),
          "--rand_augment", "", "--random_erasing", "0", *FINE_TUNE_FLAGS])  # fmt: skip
    assert built[-1]["rand_augment"] is None and built[-1]["random_erasing"] == 0.0 and built[-1]["color_jitter"] == 0.4
    # Only the default gives way to RandAugment: a strength the user asks for is kept.
    main(["--model_name_or_path", tiny_mim_dir, "--train_dir", image_folder, "--output_dir", str(tmp_path / "c"),
          "--color_jitter", "0.2", *FINE_TUNE_FLAGS])  # fmt: skip
    assert built[-1]["rand_augment"] == "rand-m9-mstd0.5-inc1" and built[-1]["color_jitter"] == 0.2


def test_fine_tuning_at_a_larger_resolution(tiny_mim_dir, image_folder, tmp_path):
    source = BeitMimForMaskedImageModeling.from_pretrained(tiny_mim_dir)
    side = 2 * source.config.image_size
    main(["--model_name_or_path", tiny_mim_dir, "--train_dir", image_folder, "--output_dir", str(tmp_path),
          "--image_size", str(side), *FINE_TUNE_FLAGS])  # fmt: skip
    model = BeitForImageClassification.from_pretrained(tmp_path)
    grid = side // source.config.patch_size
    assert model.config.image_size == side
    assert model.beit.layers[0].relative_position_bias.relative_position_bias_table.shape[0] == (2 * grid - 1) ** 2 + 3
    processor = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert processor["size"] == {"shortest_edge": 73} and processor["crop_size"] == {"height": side, "width": side}


def test_fine_tuning_gathers_no_label_count_across_processes(tmp_path):
    # Trainer all-gathers the count of labels each step when it averages across devices; the per-batch mean
    # cross-entropy never reads it.
    from hf_mim.training.run_image_classification import ClassificationTrainingArguments

    args = ClassificationTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    assert args.average_tokens_across_devices is False


def test_a_class_no_training_image_reached_is_named_in_a_warning(tiny_mim_dir, tmp_path, caplog):
    # Its only images were undecodable: the head kept an output for it that was never trained, without a word.
    from conftest import write_images

    write_images(tmp_path / "images", 8)
    (tmp_path / "images" / "c").mkdir()
    (tmp_path / "images" / "c" / "broken.png").write_bytes(b"not a png")
    with caplog.at_level("WARNING", logger="hf_mim.training.run_image_classification"):
        main([
            "--model_name_or_path", tiny_mim_dir, "--train_dir", str(tmp_path / "images"), "--output_dir",
            str(tmp_path / "out"), "--do_train", "--max_steps", "4", "--per_device_train_batch_size", "4",
            "--learning_rate", "1e-3", "--save_strategy", "no", "--use_cpu", "--report_to", "none",
            "--dataloader_num_workers", "0",
        ])
    assert "No training image of the classes ['c'] reached this launch" in caplog.text
    assert "classes ['a'" not in caplog.text and "'b'" not in caplog.text


def test_a_process_that_counted_no_class_still_joins_the_reduction_of_the_counts(monkeypatch):
    # A process whose batches were all undecodable had no counts and skipped the reduction the others waited in.
    from types import SimpleNamespace

    import transformers

    from hf_mim.training.run_image_classification import ImageClassificationTrainer

    monkeypatch.setattr(transformers.Trainer, "train", lambda self, *args, **kwargs: "trained")
    trainer = ImageClassificationTrainer.__new__(ImageClassificationTrainer)
    trainer.class_counts, trainer.accelerator = None, SimpleNamespace(num_processes=2)
    trainer.model = SimpleNamespace(config=SimpleNamespace(num_labels=3, id2label={0: "a", 1: "b", 2: "c"}))
    reduced = []
    trainer.summed_over_processes = lambda *counts: reduced.append(counts) or [2, 1, 1]
    trainer.is_world_process_zero = lambda: True
    assert trainer.train() == "trained" and reduced == [(0, 0, 0)]
