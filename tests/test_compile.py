"""Compiled training steps: every MIM model's forward and backward, frozen tokenizer included, compiles whole and
matches eager.

`torch.compile(fullgraph=True)` refuses a graph break, and dynamo breaks the graph on every operation whose result
the host must read: `.item()`, `int(tensor)`, `.tolist()`, and shapes only the data decides (`nonzero`, boolean-mask
gathers). A step that compiles with `fullgraph=True` therefore performs no device-to-host synchronisation; on a GPU
that is what keeps the host queueing work ahead of the device. That is checked here on the CPU. The steps are given
`num_masked` (every image masks the same number of patches), which turns the boolean-mask gathers into gathers of
static shape; input checks that read values (pixel ranges, CCViT's mask overlap) run in eager calls only.

The backend is "aot_eager": dynamo traces the forward, AOTAutograd traces the backward from it, and the graphs run
with eager kernels, so the check needs no C++ compiler and stays fast; Inductor would compile the same graphs.
"""

import numpy as np
import pytest
import torch
from conftest import TINY_CONFIGS, tiny_beit_config, tiny_mcbeit_config
from test_beitv2 import tiny_beitv2_config
from test_ccvit import tiny_ccvit
from test_run_mim import log_steps, run_mim_args
from test_vqkd import tiny_vqkd_config

from hf_mim import BeitMimForMaskedImageModeling, Beitv2ForMaskedImageModeling, McBeitForMaskedImageModeling
from hf_mim.data import BlockwiseMaskingGenerator, ReplacementPositionGenerator
from hf_mim.models.modeling_vqkd import VqkdCodebook
from hf_mim.training.run_mim import main

BATCH = 3
NUM_MASKED = 6
NUM_REPLACED = 2


def masks(num_replaced=0, seed=0):
    """Exact blockwise masks of `NUM_MASKED` patches (and `num_replaced` disjoint replaced ones) of a 4x4 grid."""
    rng = np.random.default_rng(seed)
    masking = BlockwiseMaskingGenerator(4, NUM_MASKED, min_num_patches=2, exact=True)
    masked = [masking(rng) for _ in range(BATCH)]
    as_tensor = lambda grids: torch.from_numpy(np.stack(grids).reshape(BATCH, -1))
    if not num_replaced:
        return as_tensor(masked), None
    replacing = ReplacementPositionGenerator(4, num_replaced)
    return as_tensor(masked), as_tensor([replacing(mask, rng) for mask in masked])


def pixels(side, seed):
    return torch.rand(BATCH, 3, side, side, generator=torch.Generator().manual_seed(seed))


def beit_case():
    model = BeitMimForMaskedImageModeling(tiny_beit_config())
    mask, _ = masks()
    return model, {"pixel_values": pixels(32, 1) * 2 - 1, "bool_masked_pos": mask,
                   "tokenizer_pixel_values": pixels(16, 2), "num_masked": NUM_MASKED}


def beitv2_case():
    model = Beitv2ForMaskedImageModeling(tiny_beitv2_config(num_hidden_layers=2, early_layers=1, head_layers=1))
    mask, _ = masks()
    return model, {"pixel_values": pixels(32, 1) * 2 - 1, "bool_masked_pos": mask,
                   "tokenizer_pixel_values": pixels(32, 2), "num_masked": NUM_MASKED}


def mcbeit_case():
    # The tiny dVAE: the VQGAN's attention and group norms add compile time without adding anything to check.
    model = McBeitForMaskedImageModeling(tiny_mcbeit_config(tokenizer=TINY_CONFIGS["hf_mim_dvae"]()))
    mask, _ = masks()
    return model, {"pixel_values": pixels(32, 1) * 2 - 1, "bool_masked_pos": mask,
                   "tokenizer_pixel_values": pixels(16, 2), "num_masked": NUM_MASKED}


def ccvit_case():
    model = tiny_ccvit()
    mask, replaced = masks(NUM_REPLACED)
    return model, {"pixel_values": pixels(32, 1), "bool_masked_pos": mask, "bool_replaced_pos": replaced,
                   "num_masked": NUM_MASKED, "num_replaced": NUM_REPLACED}


CASES = {"beit (dVAE)": beit_case, "beitv2 (VQ-KD)": beitv2_case, "mcbeit (dVAE)": mcbeit_case,
         "ccvit (k-means)": ccvit_case}


def training_step(model, inputs, step=None):
    """Outputs and parameter gradients of one forward and backward of `step` (by default `model` itself)."""
    # The same stochastic-depth draws in every run.
    torch.manual_seed(0)
    model.zero_grad(set_to_none=True)
    outputs = (model if step is None else step)(**inputs)
    outputs.loss.backward()
    grads = {name: parameter.grad.clone() for name, parameter in model.named_parameters() if parameter.grad is not None}
    return outputs, grads


@pytest.mark.parametrize("case", sorted(CASES))
def test_training_step_compiles_whole_and_matches_eager(case):
    torch.manual_seed(0)
    model, inputs = CASES[case]()
    model.train()
    eager, eager_grads = training_step(model, inputs)
    # Without the count, the eager step takes the boolean-mask gathers: the static path must give the same numbers.
    boolean, boolean_grads = training_step(model, {**inputs, "num_masked": None})
    torch.testing.assert_close(eager.loss, boolean.loss, rtol=0, atol=0)
    torch.testing.assert_close(eager.logits, boolean.logits, rtol=0, atol=0)
    assert torch.equal(eager.labels, boolean.labels)
    assert eager_grads.keys() == boolean_grads.keys()
    for name in eager_grads:
        torch.testing.assert_close(eager_grads[name], boolean_grads[name], rtol=0, atol=0, msg=name)

    torch._dynamo.reset()
    compiled, compiled_grads = training_step(
        model, inputs, step=torch.compile(model, fullgraph=True, backend="aot_eager")
    )
    torch.testing.assert_close(compiled.loss, eager.loss)
    torch.testing.assert_close(compiled.logits, eager.logits)
    assert torch.equal(compiled.labels, eager.labels)
    assert compiled_grads.keys() == eager_grads.keys() and eager_grads
    for name in eager_grads:
        torch.testing.assert_close(compiled_grads[name], eager_grads[name], msg=name)


def test_a_wrong_mask_count_fails():
    model, inputs = beit_case()
    with pytest.raises(RuntimeError, match="every image was said to mask 5 patches"):
        model(**{**inputs, "num_masked": 5})


def test_run_mim_trains_with_torch_compile(tiny_dvae_dir, image_folder, tmp_path):
    main(run_mim_args(tiny_dvae_dir, image_folder, tmp_path, "--max_steps", "2", "--save_strategy", "no",
                      "--torch_compile", "--torch_compile_backend", "aot_eager"))
    steps, _ = log_steps(tmp_path)
    assert steps == [1, 2]


def test_vqkd_codebook_reads_its_initialised_flag_again_after_a_load():
    """The frozen VQ-KD keeps `initted` once read as 1 (no host read per call), but a loaded state decides anew."""
    codebook = VqkdCodebook(tiny_vqkd_config(kmeans_init=False))
    codebook.initted.fill_(1.0)
    assert codebook.is_initialised
    codebook.load_state_dict({**codebook.state_dict(), "initted": torch.zeros(1)})
    assert not codebook.is_initialised


class GatherCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the operations whose output size only the data decides: each reads a count back to the host."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        indices = args[1] if func is torch.ops.aten.index.Tensor else ()
        if func in (torch.ops.aten.nonzero.default, torch.ops.aten.masked_select.default) or any(
            getattr(index, "dtype", None) == torch.bool for index in indices
        ):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("exact", [True, False], ids=["exact masks", "at most N masked"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_the_trainer_gives_the_model_the_collators_exact_counts(case, exact, tmp_path):
    # Without the counts every training step gathers the masked rows by boolean masks: a synchronisation each.
    from hf_mim.data import MimDataCollator
    from hf_mim.training.arguments import MimTrainingArguments
    from hf_mim.training.trainer import MimTrainer

    model, inputs = CASES[case]()
    views = {key: value for key, value in inputs.items() if key in ("pixel_values", "tokenizer_pixel_values")}
    examples = [{key: value[index] for key, value in views.items()} for index in range(BATCH)]
    replacing = "num_replaced" in inputs
    collator = MimDataCollator(
        BlockwiseMaskingGenerator(4, NUM_MASKED, min_num_patches=2, exact=exact),
        replacement_generator=ReplacementPositionGenerator(4, NUM_REPLACED) if replacing else None,
    )
    args = MimTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = MimTrainer(model=model, args=args, data_collator=collator)
    batch = collator(examples)
    expected = {"num_masked": NUM_MASKED, **({"num_replaced": NUM_REPLACED} if replacing else {})} if exact else {}
    assert collator.exact_counts() == expected
    model.train()
    with GatherCounter() as counter:
        trainer.compute_loss(model, batch).backward()
    assert (counter.count == 0) == exact
