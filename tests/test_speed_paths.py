"""Work that the speed optimisations leave out stays left out, and the results stay those of the plain computation."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_mcbeit_config
from torch.utils.flop_counter import FlopCounterMode

from hf_mim import McBeitForMaskedImageModeling, soft_targets


def masks(batch_size: int, num_patches: int, counts: list[int], seed: int = 0) -> torch.BoolTensor:
    """Masks with `counts[i]` random masked patches in image i."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch_size, num_patches, dtype=torch.bool)
    for row, count in zip(mask, counts):
        row[torch.randperm(num_patches, generator=generator)[:count]] = True
    return mask


def flops(run) -> int:
    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


@pytest.mark.parametrize("counts", [[5, 5, 5], [2, 7, 16]], ids=["equal_counts", "unequal_counts"])
@pytest.mark.parametrize("similarity_weight", [0.0, 0.2, 1.0])
@pytest.mark.parametrize("detach", [False, True])
def test_masked_soft_targets_equal_the_masked_rows_of_all_targets(counts, similarity_weight, detach):
    torch.manual_seed(0)
    logits = torch.randn(3, 16, 64)
    features = torch.randn(3, 16, 8, requires_grad=True)
    mask = masks(3, 16, counts)
    kwargs = {"similarity_weight": similarity_weight, "detach_similarity_features": detach}
    everything = soft_targets(logits, features, **kwargs)[mask]
    masked = soft_targets(logits, features, bool_masked_pos=mask, **kwargs)
    torch.testing.assert_close(masked, everything, rtol=1e-6, atol=1e-7)
    if similarity_weight and not detach:
        weights = torch.randn_like(everything)
        expected = torch.autograd.grad((everything * weights).sum(), features)[0]
        actual = torch.autograd.grad((masked * weights).sum(), features)[0]
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-7)


def test_masked_soft_targets_form_only_the_masked_rows():
    """The mixture W @ P (patches x patches x vocabulary) dominates; only masked rows of it are formed."""
    logits, features = torch.randn(2, 16, 64), torch.randn(2, 16, 8)
    mask = masks(2, 16, [4, 4])
    full = flops(lambda: soft_targets(logits, features))
    masked = flops(lambda: soft_targets(logits, features, bool_masked_pos=mask))
    assert masked * 16 == full * 4


def test_mcbeit_forward_cost_per_masked_patch_includes_its_target_row():
    """Each extra masked patch costs its LM-head row and its row of the target mixture, and nothing else grows: the
    model asks `soft_targets` for the masked rows only."""
    torch.manual_seed(0)
    config = tiny_mcbeit_config()
    model = McBeitForMaskedImageModeling(config).eval()
    num_patches, hidden, vocab = model.num_patches, config.hidden_size, config.vocab_size
    pixel_values, tokenizer_logits = torch.randn(2, 3, 32, 32), torch.randn(2, num_patches, vocab)
    costs = {}
    for count in (4, 8):
        mask = masks(2, num_patches, [count, count])
        with torch.no_grad():
            costs[count] = flops(lambda: model(pixel_values, mask, tokenizer_logits=tokenizer_logits))
    per_masked_patch = (costs[8] - costs[4]) / (2 * 4)
    assert per_masked_patch == 2 * hidden * vocab + 2 * num_patches * hidden + 2 * num_patches * vocab


def test_mcbeit_loss_and_gradients_match_targets_formed_for_every_patch():
    torch.manual_seed(0)
    model = McBeitForMaskedImageModeling(tiny_mcbeit_config()).eval()
    pixel_values, tokenizer_logits = torch.randn(3, 3, 32, 32), torch.randn(3, 16, 64)
    mask = masks(3, 16, [3, 9, 12])
    out = model(pixel_values, mask, tokenizer_logits=tokenizer_logits)
    out.loss.backward()
    gradient = model.beit.embeddings.patch_embeddings.projection.weight.grad.clone()
    model.zero_grad()

    hidden_states = model.forward_features(pixel_values, mask).last_hidden_state
    logits = model.forward_head(hidden_states, mask)
    config = model.config
    targets = soft_targets(
        tokenizer_logits, model.layernorm(hidden_states[:, 1:]), config.target_temperature,
        config.similarity_temperature, config.similarity_weight,
    )[mask]
    reference = F.cross_entropy(logits, targets)
    reference.backward()
    torch.testing.assert_close(out.loss, reference)
    torch.testing.assert_close(gradient, model.beit.embeddings.patch_embeddings.projection.weight.grad)
