"""Device placement: models, tokenizers and their training and evaluation code keep every tensor on the inputs' device.

Users train on GPUs; these tests run without one. A CPU tensor meeting a `meta` tensor fails as it fails meeting a
CUDA one ("... is not on the expected device"), so the models run here on the meta device: shapes and dtypes, no data.
What meta cannot run is faked where it happens, and only there:

- `torch.autocast` has no meta device type (it raises "unsupported scalarType"): it is a no-op context on meta;
- a boolean-mask gather has a size only the data decides (`nonzero`): meta is told to assume every element is selected
  (`meta_nonzero_assume_all_nonzero`), and the host reads below answer consistently with that;
- host reads (`host_scalars`: input checks, data-dependent counts) return given values, after stacking what they read
  on meta, so a value computed on the CPU still fails;
- the VQ-KD codebook's `is_initialised` flag is a value of a buffer, which meta does not have.

The k-means fit is driven by its values throughout (assignments, empty clusters, inertia on the host), so it runs on
CPU data with the *default* device set to meta instead: a tensor made without a device lands on meta and fails where
it meets the data, as it would land on the CPU beside CUDA data. That catches factories without a device, not data
moved to the CPU on purpose (`torch.from_numpy` without `.to(device)`).

Meta checks devices where its kernels do, which is almost everywhere; one exception seen: `scatter_add`'s `src` on the
CPU passes on meta.
"""

import contextlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.fx.experimental._config as fx_config
from conftest import TINY_CONFIGS, tiny_beit_config, tiny_dvae_config, tiny_feature_kmeans_config, tiny_mcbeit_config
from PIL import Image
from test_beitv2 import tiny_beitv2_config
from test_vqkd import tiny_vqkd_config

from hf_mim import (
    BeitMimForMaskedImageModeling,
    Beitv2ForMaskedImageModeling,
    CcvitForMaskedImageModeling,
    DvaeImageProcessor,
    DvaeModel,
    FeatureKmeansModel,
    KmeansModel,
    McBeitForMaskedImageModeling,
    MimImageProcessor,
    VqganModel,
    VqkdModel,
)
from hf_mim import visualization
from hf_mim.evaluation.probe import LinearProbe
from hf_mim.models import modeling_ccvit, modeling_mcbeit, modeling_vqkd
from hf_mim.models.modeling_mcbeit import soft_targets
from hf_mim.models.modeling_tokenizer import MimTokenizerPreTrainedModel
from hf_mim.models.modeling_vqkd import VqkdCodebook
from hf_mim.training.kmeans import fit_kmeans

META = torch.device("meta")
BATCH = 2
NUM_PATCHES = 16  # 32 px images, 8 px patches


@pytest.fixture
def on_meta(monkeypatch):
    """Lets models run on the meta device (see the module docstring)."""
    autocast = torch.autocast

    def autocast_off_meta(device_type, *args, **kwargs):
        return contextlib.nullcontext() if device_type == "meta" else autocast(device_type, *args, **kwargs)

    monkeypatch.setattr(torch, "autocast", autocast_off_meta)
    with fx_config.patch(meta_nonzero_assume_all_nonzero=True):
        yield


def answer_host_reads(monkeypatch, module, *answers) -> list:
    """Replace `module.host_scalars` by a fake answering its calls in order with `answers` (tuples of values).

    Each call still stacks what it reads, which fails for a value on another device than meta. Returns the answers not
    yet given: empty once the forward has gone through every read.
    """
    pending = list(answers)

    def host_scalars(*values):
        stacked = torch.stack([value.detach().float() for value in values])
        assert stacked.device == META
        answer = pending.pop(0)
        assert len(answer) == len(values)
        return list(answer)

    monkeypatch.setattr(module, "host_scalars", host_scalars)
    return pending


def vqkd_initialised(monkeypatch, initialised: bool = True) -> list:
    """Fake `VqkdCodebook.is_initialised`, a buffer's value: `initialised` until `initialise` runs, True after.
    Returns the codebooks `initialise` ran on."""
    ran = []
    initialise = VqkdCodebook.initialise

    def record(codebook, vectors):
        initialise(codebook, vectors)
        ran.append(codebook)

    monkeypatch.setattr(VqkdCodebook, "initialise", record)
    monkeypatch.setattr(VqkdCodebook, "is_initialised", property(lambda codebook: initialised or codebook in ran))
    return ran


def meta_pixels(side: int) -> torch.Tensor:
    return torch.empty(BATCH, 3, side, side, device=META)


def meta_mask() -> torch.Tensor:
    return torch.empty(BATCH, NUM_PATCHES, dtype=torch.bool, device=META)


def two_layer_beitv2_config():
    return tiny_beitv2_config(num_hidden_layers=2, early_layers=1, head_layers=1)


# model_type -> (model class, tiny config, host reads of one training forward: module and answers in order).
MIM_MODELS = {
    "hf_mim_beit": (BeitMimForMaskedImageModeling, tiny_beit_config, None, ()),
    # The VQ-KD tokenizer checks that its view is in [0, 1].
    "hf_mim_beitv2": (Beitv2ForMaskedImageModeling, two_layer_beitv2_config, modeling_vqkd, ((0.0, 1.0),)),
    # The fewest and most masked patches of an image: all of them, as meta assumes.
    "hf_mim_mcbeit": (McBeitForMaskedImageModeling, tiny_mcbeit_config, modeling_mcbeit, ((NUM_PATCHES, NUM_PATCHES),)),
    # Pixels in [0, 1], masked and replaced positions disjoint.
    "hf_mim_ccvit": (CcvitForMaskedImageModeling, TINY_CONFIGS["hf_mim_ccvit"], modeling_ccvit, ((0.0, 1.0, 0.0),)),
    # BEiT on feature k-means targets: the teacher runs inside the tokenizer.
    "hf_mim_beit+feature_kmeans": (
        BeitMimForMaskedImageModeling,
        lambda: tiny_beit_config(vocab_size=16, tokenizer_config=tiny_feature_kmeans_config().to_dict()),
        None,
        (),
    ),
}


@pytest.mark.parametrize(
    "model_type, replacement",
    # CCViT runs with and without centroid replacement positions; the other models have none.
    [(model_type, False) for model_type in sorted(MIM_MODELS)] + [("hf_mim_ccvit", True)],
)
def test_mim_model_trains_on_the_inputs_device(model_type, replacement, on_meta, monkeypatch):
    model_class, config, module, answers = MIM_MODELS[model_type]
    torch.manual_seed(0)
    model = model_class(config()).to(META).train()
    pending = answer_host_reads(monkeypatch, module, *answers) if module is not None else []
    vqkd_initialised(monkeypatch)
    inputs = {"pixel_values": meta_pixels(32), "bool_masked_pos": meta_mask()}
    if replacement:
        inputs["bool_replaced_pos"] = meta_mask()
    if model_type != "hf_mim_ccvit":
        # CCViT's tokenizer reads the ViT's own view.
        inputs["tokenizer_pixel_values"] = meta_pixels(model.tokenizer.config.image_size)

    outputs = model(**inputs)
    outputs.loss.backward()

    assert not pending
    assert outputs.loss.device == META and outputs.logits.shape == (BATCH * NUM_PATCHES, model.config.vocab_size)
    trained = [parameter for parameter in model.parameters() if parameter.requires_grad]
    assert trained and all(parameter.grad is not None and parameter.grad.device == META for parameter in trained)


def test_mcbeit_targets_of_images_with_unequal_masks_stay_on_the_inputs_device(on_meta, monkeypatch):
    # Images with fewer masked patches than the most masked one go through the padded path.
    pending = answer_host_reads(monkeypatch, modeling_mcbeit, (NUM_PATCHES - 3, NUM_PATCHES))
    logits = torch.empty(BATCH, NUM_PATCHES, 64, device=META)
    features = torch.empty(BATCH, NUM_PATCHES, 32, device=META, requires_grad=True)
    targets = soft_targets(logits, features, bool_masked_pos=meta_mask())
    targets.sum().backward()
    assert not pending
    assert targets.device == META and targets.shape == (BATCH * NUM_PATCHES, 64) and features.grad.device == META


def tiny_kmeans():
    return KmeansModel(TINY_CONFIGS["hf_mim_kmeans"]())


# model_type -> tokenizer class (built with its decoder, where it has one) and the host reads of its encoder.
TOKENIZERS = {
    "hf_mim_dvae": (DvaeModel, None, ()),
    "hf_mim_vqkd": (VqkdModel, modeling_vqkd, ((0.0, 1.0),)),
    "hf_mim_vqgan": (VqganModel, None, ()),
    "hf_mim_kmeans": (KmeansModel, None, ()),
    "hf_mim_feature_kmeans": (FeatureKmeansModel, None, ()),
}


@pytest.mark.parametrize("model_type", sorted(TOKENIZERS))
def test_tokenizer_codes_and_decoding_stay_on_the_inputs_device(model_type, on_meta, monkeypatch):
    tokenizer_class, module, answers = TOKENIZERS[model_type]
    tokenizer = tokenizer_class(TINY_CONFIGS[model_type]()).to(META).eval()
    vqkd_initialised(monkeypatch)
    config = tokenizer.config
    pixel_values = meta_pixels(config.image_size)

    # The first call reads its view's range on the host; later ones assert it on the device.
    pending = answer_host_reads(monkeypatch, module, *answers) if module is not None else []
    logits = tokenizer.get_codebook_logits(pixel_values)
    indices = tokenizer.get_codebook_indices(pixel_values)
    assert not pending
    assert logits.device == META and logits.shape == (BATCH, config.grid_size**2, config.codebook_size)
    assert indices.device == META and indices.shape == (BATCH, config.grid_size**2)
    if type(tokenizer).decode is not MimTokenizerPreTrainedModel.decode:
        decoded = tokenizer.decode(indices)
        assert decoded.device == META and decoded.shape == (BATCH, 3, config.image_size, config.image_size)


def test_kmeans_reconstruction_and_centroid_replacement_stay_on_the_inputs_device(on_meta):
    tokenizer = tiny_kmeans().to(META)
    pixel_values = meta_pixels(32)
    outputs = tokenizer(pixel_values)
    replaced = tokenizer.replace_patches(pixel_values, meta_mask())
    assert {outputs.indices.device, outputs.sq_distances.device, outputs.reconstruction.device} == {META}
    assert replaced.device == META and replaced.shape == pixel_values.shape


@pytest.mark.parametrize("training", [True, False], ids=["gumbel", "argmax"])
def test_dvae_training_loss_stays_on_the_inputs_device(training, on_meta):
    model = DvaeModel(tiny_dvae_config()).to(META).train(training)
    outputs = model(meta_pixels(16), temperature=0.5, kl_weight=1e-3)
    outputs.loss.backward()
    assert outputs.loss.device == META and outputs.reconstruction.shape == (BATCH, 3, 16, 16)
    assert model.encoder.input_conv.weight.grad.device == META


@pytest.mark.parametrize("saw_a_batch", [True, False])
def test_dvae_code_balancing_stays_on_the_model_device(saw_a_batch):
    """The step's code counts, all-reduced, move the encoder's biases where they live (a process without a batch
    this step joins the reduction with zeros made there)."""
    from hf_mim.training.dvae import DvaeTrainer

    model = DvaeModel(tiny_dvae_config()).to(META)
    reduced = []

    def reduce(tensor, reduction):
        reduced.append(tensor.device)
        return tensor

    counts = torch.empty(model.config.codebook_size, dtype=torch.long, device=META) if saw_a_batch else None
    accelerator = SimpleNamespace(unwrap_model=lambda model: model, reduce=reduce)
    trainer = SimpleNamespace(accelerator=accelerator, model=model, _step_counts=counts, code_balance_rate=0.1)
    DvaeTrainer.balance_codes(trainer)
    assert reduced == [META] and trainer._step_counts is None
    assert model.encoder.output_conv.bias.device == META


def test_vqkd_training_step_stays_on_the_inputs_device(on_meta, monkeypatch):
    """k-means initialisation on the first batch, the EMA update and dead-code restarts, and the loss."""
    config = tiny_vqkd_config(kmeans_init=True, dead_code_restart_steps=1)
    model = VqkdModel(config).to(META).train()
    initialised = vqkd_initialised(monkeypatch, initialised=False)
    # The view's range, then how many codes are dead: every one of them, as meta assumes of the mask.
    pending = answer_host_reads(monkeypatch, modeling_vqkd, (0.0, 1.0), (config.codebook_size,))
    target_features = torch.empty(BATCH, NUM_PATCHES, config.teacher_dim, device=META)

    outputs = model(meta_pixels(32), target_features=target_features)
    outputs.loss.backward()

    assert initialised == [model.codebook] and not pending
    assert {outputs.loss.device, outputs.codebook_restarts.device, model.codebook.weight.device} == {META}
    assert model.encoder.embeddings.patch_embeddings.projection.weight.grad.device == META


def test_linear_probe_is_built_on_the_features_device():
    features = torch.empty(8, 32, device=META)
    probe = LinearProbe(features.mean(dim=0), features.std(dim=0), num_classes=3)
    logits = probe(features)
    assert logits.device == META and logits.shape == (8, 3)


def test_mim_panel_feeds_the_model_on_the_model_device(on_meta, monkeypatch):
    """The panel's views are made on the CPU from PIL images; the model may live on an accelerator."""
    model = BeitMimForMaskedImageModeling(tiny_beit_config()).to(META)
    predict_tokens = visualization.predict_tokens

    def predict_on_meta(model, *inputs):
        targets, predicted = predict_tokens(model, *inputs)
        assert targets.device == META and predicted.device == META
        # Meta holds no ids to draw: the panel gets CPU ids of the same shape.
        return torch.zeros(targets.shape, dtype=torch.long), torch.zeros(predicted.shape, dtype=torch.long)

    monkeypatch.setattr(visualization, "predict_tokens", predict_on_meta)
    images = [Image.new("RGB", (40, 40), color) for color in ("red", "blue")]
    processor = MimImageProcessor(size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32})
    tokenizer_processor = DvaeImageProcessor(size={"height": 16, "width": 16}, crop_size={"height": 16, "width": 16})
    mask = torch.zeros(BATCH, NUM_PATCHES, dtype=torch.bool)
    mask[:, :4] = True
    figure, tokens = visualization.mim_panel(model, processor, tokenizer_processor, images, mask, cell_size=32)
    assert figure.size[0] > 0 and tokens["token_ids"].shape == (BATCH, NUM_PATCHES)


def kmeans_points(dtype: torch.dtype) -> torch.Tensor:
    points = torch.rand(300, 12, generator=torch.Generator().manual_seed(0))
    return (points * 255).round().to(torch.uint8) if dtype == torch.uint8 else points


@pytest.mark.parametrize(
    "dtype, init",
    [
        (torch.float32, "random"),
        (torch.float32, "k-means++"),
        # 8-bit pixels on the CPU take the integer kernel.
        (torch.uint8, "random"),
        # A centroid far from every point is left empty and re-seeded.
        (torch.float32, "far"),
        (torch.uint8, "far"),
    ],
)
def test_kmeans_fit_makes_every_tensor_on_the_points_device(dtype, init, caplog):
    points = kmeans_points(dtype)
    if init == "far":
        init = torch.rand(8, 12, generator=torch.Generator().manual_seed(1))
        init[0] = 100.0
    with caplog.at_level("INFO", logger="hf_mim.training.kmeans"), torch.device(META):
        fit = fit_kmeans(points, 8, num_iterations=3, init=init, show_progress=False)
    assert fit.centroids.shape == (8, 12) and torch.isfinite(fit.centroids).all()
    assert np.all(np.diff(fit.inertia) <= 1e-6 * fit.inertia[0])
    if isinstance(init, torch.Tensor):
        assert "Re-seeding 1 empty clusters" in caplog.text


class HostTensorsMeetingMeta(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts operations that read a CPU tensor of one element or more into a meta result: on a GPU, a copy from
    pageable memory that waits for the device (meta accepts such indices where a CUDA table would copy them)."""

    def __init__(self):
        super().__init__()
        self.operations = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        flat = torch.utils._pytree.tree_leaves((args, kwargs))
        host = [arg for arg in flat if isinstance(arg, torch.Tensor) and arg.device.type == "cpu" and arg.numel() > 1]
        outputs = [out for out in torch.utils._pytree.tree_leaves(output) if isinstance(out, torch.Tensor)]
        if host and any(out.device.type == "meta" for out in outputs):
            self.operations.append(str(func))
        return output


@pytest.mark.parametrize("model_type", ["hf_mim_beit", "hf_mim_beitv2"])
def test_relative_position_index_is_copied_to_the_device_once(model_type, on_meta, monkeypatch):
    model_class, config, module, answers = MIM_MODELS[model_type]
    model = model_class(config()).to(META).train()
    vqkd_initialised(monkeypatch)
    inputs = {"pixel_values": meta_pixels(32), "bool_masked_pos": meta_mask(),
              "tokenizer_pixel_values": meta_pixels(model.tokenizer.config.image_size)}
    pending = answer_host_reads(monkeypatch, module, *answers) if module is not None else []
    model(**inputs).loss.backward()
    with HostTensorsMeetingMeta() as counter:
        model(**inputs).loss.backward()
    assert counter.operations == [] and not pending


@pytest.mark.parametrize("shared", [True, False])
def test_a_beit_teacher_copies_its_position_index_to_the_device_once(shared, on_meta):
    # Feature k-means with a BEiT teacher computes BEiT's targets every step, VQ-KD distils one: transformers' index,
    # built on the CPU, was copied from the host at every call (per layer with per-layer tables).
    from transformers import BeitConfig, BeitModel

    from hf_mim.models.teacher import PatchFeatureTeacher

    config = BeitConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, image_size=32,
                        patch_size=8, use_shared_relative_position_bias=shared, use_relative_position_bias=not shared,
                        use_absolute_position_embeddings=False)  # fmt: skip
    teacher = PatchFeatureTeacher(BeitModel(config), (0.5,) * 3, (0.5,) * 3, grid_size=4).to(META)
    teacher(meta_pixels(32))
    with HostTensorsMeetingMeta() as counter:
        teacher(meta_pixels(32))
    assert counter.operations == []


def test_feature_extraction_keeps_a_stock_beits_position_index_on_the_device():
    from transformers import BeitConfig, BeitModel
    from PIL import Image

    from hf_mim.evaluation.features import extract_features
    from hf_mim.models import MimImageProcessor
    from hf_mim.models.beit_backbone import DeviceRelativePositionBias

    config = BeitConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, image_size=32,
                        patch_size=8, use_relative_position_bias=True)  # fmt: skip
    encoder = BeitModel(config)
    processor = MimImageProcessor(size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32})
    image = Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8))
    extract_features(encoder, processor, [image, image], labels=[0, 1], layers=(-1,), device="cpu")
    biases = [module for module in encoder.modules() if "RelativePositionBias" in type(module).__name__]
    assert len(biases) == 2 and all(type(module) is DeviceRelativePositionBias for module in biases)


def test_feature_extraction_runs_the_final_norm_on_the_encoders_device(monkeypatch):
    # The MIM head's LayerNorm is not part of the encoder that extraction moves to the device; on a GPU it would stay
    # on the host and meet the encoder's CUDA tokens.
    from hf_mim import BeitMimForMaskedImageModeling
    from hf_mim.evaluation import features
    from hf_mim.models import MimImageProcessor

    model = BeitMimForMaskedImageModeling(tiny_beit_config())
    seen = []

    def encode_batch(encoder, pixel_values, layers, pooling, final_norm=None):
        seen.append({pixel_values.device, next(encoder.parameters()).device, final_norm.weight.device})
        return {layer: torch.zeros(len(pixel_values), encoder.config.hidden_size) for layer in layers}

    monkeypatch.setattr(features, "encode_batch", encode_batch)
    side = model.config.image_size
    processor = MimImageProcessor(size={"height": side, "width": side}, crop_size={"height": side, "width": side})
    image = Image.fromarray(np.zeros((side, side, 3), dtype=np.uint8))
    with pytest.raises(NotImplementedError, match="Cannot copy out of meta"):  # moving back, after extraction
        features.extract_features(model, processor, [image, image], labels=[0, 1], final_norm=True, device=META)
    assert seen == [{META}]


def test_feature_kmeans_sampling_moves_each_batchs_patch_positions_in_one_copy(on_meta):
    # One copy per image, each waiting on a GPU for the teacher's forward of the batch; the features are unchanged.
    import datasets
    from PIL import Image

    from hf_mim import FeatureKmeansModel
    from hf_mim.models.image_processing_feature_kmeans import FeatureKmeansImageProcessor
    from hf_mim.training.kmeans.features import sample_features
    from hf_mim.training.kmeans.patches import sampled_patches

    config = tiny_feature_kmeans_config()
    colours = ("red", "blue", "green", "white", "black", "gray")
    images = [Image.new("RGB", (40, 40), colour) for colour in colours]
    dataset = datasets.Dataset.from_dict({"image": images}).cast_column("image", datasets.Image())
    processor = FeatureKmeansImageProcessor.for_config(config)
    tokenizer = FeatureKmeansModel(config).eval()
    features, ids = sample_features(dataset, "image", processor, tokenizer, patches_per_image=3, batch_size=4,
                                    show_progress=False)  # fmt: skip
    views = torch.stack([processor(image, return_tensors="pt")["pixel_values"][0] for image in images])
    with torch.no_grad():
        encoded = tokenizer.encode(views)
    num_patches = config.grid_size**2
    expected = [sampled_patches(index, num_patches, 3, 0) for index in range(len(images))]
    torch.testing.assert_close(features, torch.cat([encoded[i, positions] for i, (positions, _) in enumerate(expected)]))
    assert torch.equal(ids, torch.cat([patch_ids for _, patch_ids in expected]))

    tokenizer.to(META)
    with HostTensorsMeetingMeta() as counter:
        sample_features(dataset, "image", processor, tokenizer, patches_per_image=3, batch_size=4, show_progress=False)
    # Two batches: the views and the positions of each, and the ids once at the end.
    assert len(counter.operations) <= 5, counter.operations


def test_relative_position_bias_kept_on_the_device_equals_transformers():
    from transformers import BeitConfig
    from transformers.models.beit.modeling_beit import BeitRelativePositionBias

    from hf_mim.models.beit_backbone import DeviceRelativePositionBias, keep_position_index_on_device

    config = BeitConfig(image_size=32, patch_size=8, num_attention_heads=2, use_shared_relative_position_bias=True,
                        hidden_size=16, num_hidden_layers=1, intermediate_size=32)
    reference = BeitRelativePositionBias(config)
    torch.nn.init.normal_(reference.relative_position_bias_table)
    holder = torch.nn.Module()
    holder.bias = reference.eval()
    keep_position_index_on_device(holder)
    assert not holder.bias.training
    assert type(holder.bias) is DeviceRelativePositionBias
    assert holder.bias.relative_position_bias_table is reference.relative_position_bias_table
    for window, interpolate, dim_size in [((4, 4), False, 17), ((4, 4), True, 17), ((6, 5), False, 31)]:
        assert torch.equal(holder.bias(window, interpolate, dim_size=dim_size),
                           BeitRelativePositionBias.forward(reference, window, interpolate, dim_size=dim_size))


@pytest.mark.parametrize("model_type", ["hf_mim_beitv2", "hf_mim_ccvit"])
def test_input_checks_read_the_host_at_the_first_step_only_and_assert_on_the_device_after(model_type, on_meta,
                                                                                            monkeypatch):
    # A host read per step would stall the GPU at every step; the first step's read gives the clear error.
    model_class, config, module, answers = MIM_MODELS[model_type]
    model = model_class(config()).to(META).train()
    vqkd_initialised(monkeypatch)
    inputs = {"pixel_values": meta_pixels(32), "bool_masked_pos": meta_mask()}
    if model_type == "hf_mim_ccvit":
        inputs["bool_replaced_pos"] = meta_mask()
    else:
        inputs["tokenizer_pixel_values"] = meta_pixels(model.tokenizer.config.image_size)
    asserted = []
    monkeypatch.setattr(torch, "_assert_async", lambda condition, message: asserted.append(message))
    pending = answer_host_reads(monkeypatch, module, *answers)
    for _ in range(3):
        model(**inputs, num_masked=NUM_PATCHES // 2).loss.backward()
    assert not pending and len([message for message in asserted if "pixels" in message]) == 2


def test_fine_tuning_counts_classes_and_mixes_on_the_inputs_device(tmp_path, on_meta):
    # torch.bincount, which sized its output from the largest label, has no meta kernel and reads the host on a GPU.
    from transformers import BeitConfig, BeitForImageClassification

    from hf_mim.training.mixup import MixupCutmix
    from hf_mim.training.run_image_classification import ClassificationTrainingArguments, ImageClassificationTrainer

    config = BeitConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                        image_size=32, patch_size=8, num_labels=3)  # fmt: skip
    args = ClassificationTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = ImageClassificationTrainer(model=BeitForImageClassification(config), args=args, mixup=MixupCutmix(3))
    on_device = BeitForImageClassification(config).to(META).train()
    inputs = {"pixel_values": meta_pixels(32), "labels": torch.zeros(BATCH, dtype=torch.long, device=META)}
    loss = trainer.compute_loss(on_device, inputs)
    assert loss.device == META and trainer.class_counts.device == META and trainer.class_counts.shape == (3,)
