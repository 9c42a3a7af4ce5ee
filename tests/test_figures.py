"""PNG figures: written, valid, and of the documented size."""

import json

import numpy as np
import pytest
import torch
from conftest import TINY_CONFIGS, tiny_beit_config
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForMaskedImageModeling, BeitConfig

from hf_mim import BeitMimForMaskedImageModeling, DvaeImageProcessor, DvaeModel, MimImageProcessor
from hf_mim.visualization import (
    PADDING,
    TITLE_HEIGHT,
    codebook_histogram,
    decode_or_none,
    mim_panel,
    main,
    mask_overlay,
    token_map,
    training_curves,
    write_figures,
)

LOG_HISTORY = [{"step": step, "loss": 9.0 - step, "masked_accuracy": 0.01 * step} for step in range(1, 6)] + [
    {"step": 5, "eval_loss": 4.5, "eval_masked_accuracy": 0.04},
    {"step": 5, "train_loss": 7.0, "train_runtime": 1.0},
]


def grid_size(rows, columns, cell):
    return columns * (cell + PADDING) + PADDING, TITLE_HEIGHT + rows * (cell + PADDING) + PADDING


def assert_png(path, size):
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == size
        image.verify()


@pytest.fixture(scope="module")
def pretrained_dir(tiny_dvae_dir, tmp_path_factory):
    """A MIM checkpoint as run_mim.py writes it from the standalone tokenizer `tiny_dvae_dir`: its tokenizer is held
    without the decoder, its 16 px view's processor is under `tokenizer/`."""
    path = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(0)
    model = BeitMimForMaskedImageModeling(tiny_beit_config())
    model.set_tokenizer(DvaeModel.from_pretrained(tiny_dvae_dir))
    model.save_pretrained(path)
    MimImageProcessor(size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    DvaeImageProcessor(size={"height": 16, "width": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(
        path / "tokenizer"
    )
    return str(path)


@pytest.fixture(scope="module")
def loaded(pretrained_dir):
    model = BeitMimForMaskedImageModeling.from_pretrained(pretrained_dir)
    assert model.tokenizer.decoder is None
    processors = [AutoImageProcessor.from_pretrained(path) for path in (pretrained_dir, f"{pretrained_dir}/tokenizer")]
    return model, *processors


def photos(count):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (30, 44, 3), dtype=np.uint8)) for _ in range(count)]


def test_figures_are_valid_pngs_of_the_right_size(loaded, tiny_dvae_dir, tmp_path):
    model, processor, tokenizer_processor = loaded
    masks = torch.zeros(3, 16, dtype=torch.bool)
    masks[:, :6] = True
    written = write_figures(
        str(tmp_path), model, processor, tokenizer_processor, photos(3), masks, {"log_history": LOG_HISTORY},
        cell_size=48, decoding_tokenizer=DvaeModel.from_pretrained(tiny_dvae_dir),
    )  # fmt: skip
    # input, mask, tokens, decoded, predicted: the standalone dVAE has a pixel decoder.
    assert_png(written["mim_panel"], grid_size(3, 5, 48))
    assert_png(written["codebook_usage"], (640, 240))
    # Charts of loss and masked_accuracy, each with its eval series; the run summary `train_loss` is not plotted.
    assert_png(written["training_curves"], (640, 2 * 180))
    metrics = json.loads(open(written["figure_metrics"]).read())
    assert metrics["num_masked"] == 18 and 0 <= metrics["masked_accuracy"] <= 1
    assert 1 <= metrics["num_used_codes"] <= 48 and metrics["codebook_usage"] == metrics["num_used_codes"] / 64


def test_tokenizer_without_decoder_leaves_reconstructions_out(loaded, tiny_dvae_dir, tmp_path, monkeypatch):
    model, processor, tokenizer_processor = loaded
    standalone = DvaeModel.from_pretrained(tiny_dvae_dir)

    def no_decoder(indices):
        raise NotImplementedError("no pixel decoder")

    monkeypatch.setattr(standalone, "decode", no_decoder)
    written = write_figures(
        str(tmp_path), model, processor, tokenizer_processor, photos(2), torch.ones(2, 16, dtype=torch.bool),
        cell_size=32, decoding_tokenizer=standalone,
    )  # fmt: skip
    assert_png(written["mim_panel"], grid_size(2, 3, 32))
    assert "training_curves" not in written


def test_checkpoint_without_tokenizer_decoder_draws_its_reconstructions_with_the_standalone_tokenizer(
    loaded, tiny_dvae_dir, caplog
):
    model, processor, tokenizer_processor = loaded
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[:, ::2] = True
    with caplog.at_level("WARNING", logger="hf_mim.visualization"):
        panel, tokens = mim_panel(model, processor, tokenizer_processor, photos(2), masks, cell_size=24)
    assert panel.size == grid_size(2, 3, 24)
    assert "without the decoder" in caplog.text and "--tokenizer_name_or_path" in caplog.text
    standalone = DvaeModel.from_pretrained(tiny_dvae_dir)
    panel, with_decoder = mim_panel(model, processor, tokenizer_processor, photos(2), masks, 24, standalone)
    assert panel.size == grid_size(2, 5, 24) and torch.equal(with_decoder["token_ids"], tokens["token_ids"])
    # The decoded column is what the standalone tokenizer makes of the model's targets.
    decoded = standalone.decode(tokens["token_ids"][:1])[0].mul(255).round().byte().permute(1, 2, 0).numpy()
    left, top = PADDING + 3 * (24 + PADDING), TITLE_HEIGHT + PADDING
    tile = np.asarray(panel.crop((left, top, left + 24, top + 24)))
    expected = np.asarray(Image.fromarray(decoded).resize((24, 24), Image.Resampling.NEAREST))
    assert np.array_equal(tile, expected)
    # Another tokenizer of the same family would decode the codes into other pixels.
    with pytest.raises(ValueError, match="not the one this model was pre-trained with"):
        mim_panel(model, processor, tokenizer_processor, photos(2), masks, 24, DvaeModel(standalone.config))


@pytest.mark.parametrize(
    "model_type", sorted(name for name, factory in TINY_CONFIGS.items() if isinstance(factory(), BeitConfig))
)
def test_panel_of_every_mim_family(model_type):
    config = TINY_CONFIGS[model_type]()
    model = AutoModelForMaskedImageModeling.from_config(config)
    side, tokenizer_side = config.image_size, model.tokenizer.config.image_size
    processor = MimImageProcessor(size={"height": side, "width": side})
    tokenizer_processor = MimImageProcessor(size={"height": tokenizer_side, "width": tokenizer_side}, do_normalize=False)
    masks = torch.zeros(2, model.num_patches, dtype=torch.bool)
    masks[:, ::3] = True
    panel, tokens = mim_panel(model, processor, tokenizer_processor, photos(2), masks, cell_size=24)
    has_decoder = decode_or_none(model.tokenizer, tokens["token_ids"]) is not None
    assert panel.size == grid_size(2, 5 if has_decoder else 3, 24)
    assert torch.equal(tokens["predicted_ids"][~masks], tokens["token_ids"][~masks])


def test_overlay_and_token_map_follow_the_grid():
    image = Image.new("RGB", (32, 32), (255, 255, 255))
    mask = np.zeros(16, dtype=bool)
    mask[0] = True
    overlay = np.asarray(mask_overlay(image, mask))
    assert overlay[:8, :8].max() < 255 and (overlay[8:, 8:] == 255).all()
    tokens = token_map(torch.tensor([[0, 1], [1, 0]]), (32, 32))
    array = np.asarray(tokens)
    assert tokens.size == (32, 32) and (array[0, 0] == array[31, 31]).all() and (array[0, 0] != array[0, 31]).any()


def test_histogram_and_curves_bad_input():
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        codebook_histogram([0, 9], codebook_size=8)
    with pytest.raises(ValueError, match="logged"):
        training_curves([{"step": 1, "learning_rate": 0.1}])
    assert codebook_histogram(np.arange(5000) % 3000, 3000, size=(320, 120)).size == (320, 120)


def test_tokenizer_curves_show_codebook_usage_and_perplexity():
    # A dVAE's log: the codebook's usage falling over the run is what tells a collapsing tokenizer.
    history = [
        {"step": step, "loss": 0.1 / step, "codebook_usage": 1.0 / step, "codebook_perplexity": 400.0 / step}
        for step in range(1, 5)
    ] + [{"step": 4, "eval_codebook_usage": 0.2, "eval_codebook_perplexity": 80.0}]
    # loss, codebook_perplexity (train + eval), codebook_usage (train + eval): three charts.
    assert training_curves(history, size=(320, 100)).size == (320, 3 * 100)


def test_rare_codes_stay_visible():
    histogram = np.asarray(codebook_histogram([0] * 100_000 + [1], codebook_size=2, size=(200, 100)))
    bars = (histogram == (70, 110, 180)).all(-1)
    # Two columns of bars: the dominant code's and a one-pixel bar for the code used once.
    assert bars[:, :120].any() and bars[:, 120:].sum() > 0


def test_script_writes_figures_of_a_checkpoint(pretrained_dir, tiny_dvae_dir, image_folder, tmp_path, capsys):
    (tmp_path / "state.json").write_text(json.dumps({"log_history": LOG_HISTORY}))
    flags = [
        "--model_name_or_path", pretrained_dir, "--images", f"{image_folder}/a", "--output_dir", str(tmp_path / "figures"),
        "--trainer_state", str(tmp_path / "state.json"), "--cell_size", "40", "--max_images", "3",
    ]  # fmt: skip
    # The checkpoint holds its tokenizer without the decoder: the reconstructions need the standalone tokenizer.
    assert_png(main(flags)["mim_panel"], grid_size(3, 3, 40))
    written = main([*flags, "--tokenizer_name_or_path", tiny_dvae_dir])
    assert_png(written["mim_panel"], grid_size(3, 5, 40))
    assert "masked_accuracy" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--images needs --model_name_or_path"):
        main(["--images", image_folder, "--output_dir", str(tmp_path)])




def test_script_masks_with_the_checkpoints_method_defaults(image_folder, tmp_path, monkeypatch):
    """`--masking random` masks the fraction of the checkpoint's method (mc-BEiT: 75%), not BEiT's 40%."""
    config = TINY_CONFIGS["hf_mim_mcbeit"]()
    AutoModelForMaskedImageModeling.from_config(config).save_pretrained(tmp_path / "mcbeit")
    side, tokenizer_side = config.image_size, config.tokenizer_config["image_size"]
    MimImageProcessor(size={"height": side, "width": side}).save_pretrained(tmp_path / "mcbeit")
    DvaeImageProcessor(size={"height": tokenizer_side, "width": tokenizer_side}).save_pretrained(
        tmp_path / "mcbeit" / "tokenizer"
    )
    drawn = {}
    monkeypatch.setattr("hf_mim.visualization.write_figures", lambda *args, **kwargs: drawn.update(masks=args[5]) or {})
    main(["--model_name_or_path", str(tmp_path / "mcbeit"), "--images", f"{image_folder}/a", "--masking", "random",
          "--output_dir", str(tmp_path / "figures"), "--max_images", "2"])  # fmt: skip
    assert drawn["masks"].float().mean().item() == pytest.approx(0.75, abs=1 / drawn["masks"].shape[1])

def test_a_run_shorter_than_its_logging_steps_gets_its_panels_and_no_curves(loaded, tmp_path):
    # What trainer_state.json holds after 2 steps with --logging_steps 10: only the run summary.
    state = {"log_history": [{"step": 2, "epoch": 1.0, "train_runtime": 1.0, "train_loss": 4.1}]}
    model, processor, tokenizer_processor = loaded
    written = write_figures(
        str(tmp_path), model, processor, tokenizer_processor, photos(2), torch.ones(2, 16, dtype=torch.bool),
        trainer_state=state, cell_size=32,
    )  # fmt: skip
    assert "mim_panel" in written and "training_curves" not in written
    with pytest.raises(ValueError, match="Nothing to draw"):
        write_figures(str(tmp_path / "state_only"), trainer_state=state)


def test_the_codebook_histogram_says_what_it_counts():
    # Over the 4 images of a panel a healthy codebook looks collapsed; the title says what was counted.
    plain = np.asarray(codebook_histogram([0, 1, 1], codebook_size=8, size=(400, 120)))
    titled = np.asarray(codebook_histogram([0, 1, 1], codebook_size=8, size=(400, 120), counted="the 1 image of the panel"))
    assert (plain[:20] != titled[:20]).any() and (plain[40:] == titled[40:]).all()
