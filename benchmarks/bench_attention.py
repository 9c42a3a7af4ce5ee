#!/usr/bin/env python
"""The two BEiT-layer optimisations that were tried for the MIM step goal and not kept, timed against what
transformers' `BeitModel` does, so anyone can check the "no gain" verdict in benchmarks/README.md.

    python benchmarks/bench_attention.py --output bench_attention.json

Attention (forward + backward of one layer's attention core, 197 tokens of heads of 64; by default ViT-Tiny's 3 heads,
batch 8, fp32 on the CPU; `--device cuda --dtype bf16 --heads 12 --batch_size 128` for ViT-Base on a GPU). Every
variant but the frozen one trains BEiT's relative position bias *table* (`(2W-1)^2 + 3` rows x heads), as the model
does:
- `sdpa`: the table gathered into the dense `(heads, N, N)` bias, as transformers does, and that bias given to
  `F.scaled_dot_product_attention` as the mask; the bias requires grad, so the CPU flash kernel refuses it and SDPA
  runs its math path (what transformers runs);
- `bias in baddbmm`: a hand-written autograd function adding the dense bias inside `baddbmm` and computing the bias
  gradient from the softmax gradient;
- `flash, frozen bias` (CPU): SDPA's flash kernel with a bias that needs no gradient, the bound had the bias been
  frozen (BEiT's is not);
- `flex, dense bias` and `flex, bias table` (not on the CPU, where FlexAttention has no backward): compiled
  `flex_attention` whose `score_mod` adds the dense bias, or reads the table through the position index itself (no
  dense bias, its gradient scattered into the table) — issue 17's goal 6.
Every variant's gradients (queries, keys, values, table) are compared with SDPA's before timing.
QKV projection (forward + backward on batch x 197 tokens of 64 x heads values, 8 x 197 of 192 by default): three
`Linear`s (transformers' q/k/v_proj) against one fused product.
"""

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.models.beit.modeling_beit import BeitRelativePositionBias

from common import (
    device_synchronizer,
    environment,
    markdown_table,
    paired_ratios,
    set_threads,
    time_interleaved,
    write_json,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class BiasedAttention(torch.autograd.Function):
    """softmax(q k^T * scale + bias) v with the bias added inside `baddbmm`; `bias` is (1, heads, N, N)."""

    @staticmethod
    def forward(ctx, query, key, value, bias, scale):
        batch, heads, tokens, dim = query.shape
        query, key, value = (t.reshape(batch * heads, tokens, dim) for t in (query, key, value))
        scores = torch.baddbmm(bias.expand(batch, -1, -1, -1).reshape(batch * heads, tokens, tokens), query,
                               key.transpose(1, 2), alpha=scale)  # fmt: skip
        probs = scores.softmax(-1)
        ctx.save_for_backward(query, key, value, probs)
        ctx.scale, ctx.shape = scale, (batch, heads, tokens, dim)
        return torch.bmm(probs, value).view(batch, heads, tokens, dim)

    @staticmethod
    def backward(ctx, grad_output):
        query, key, value, probs = ctx.saved_tensors
        batch, heads, tokens, dim = ctx.shape
        grad_output = grad_output.reshape(batch * heads, tokens, dim)
        grad_value = torch.bmm(probs.transpose(1, 2), grad_output)
        grad_scores = torch._softmax_backward_data(torch.bmm(grad_output, value.transpose(1, 2)), probs, -1, probs.dtype)
        grad_bias = grad_scores.view(batch, heads, tokens, tokens).sum(0, keepdim=True)
        grad_query = torch.bmm(grad_scores, key).mul_(ctx.scale)
        grad_key = torch.bmm(grad_scores.transpose(1, 2), query).mul_(ctx.scale)
        shape = (batch, heads, tokens, dim)
        return grad_query.view(shape), grad_key.view(shape), grad_value.view(shape), grad_bias, None


def dense_bias(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`(1, heads, N, N)` from the `(rows, heads)` table and the `(N, N)` position index, as transformers builds it."""
    tokens = index.shape[0]
    return table[index.view(-1)].view(tokens, tokens, -1).permute(2, 0, 1).unsqueeze(0)


def flex_score_mods(table: torch.Tensor, index: torch.Tensor) -> dict:
    """`score_mod`s adding BEiT's bias: from the dense bias (built from the table by each call), or read from the
    table through the index inside the kernel."""

    def dense(bias):
        return lambda score, batch, head, query, key: score + bias[0, head, query, key]

    def from_table(score, batch, head, query, key):
        return score + table[index[query, key], head]

    return {"flex, dense bias": lambda: dense(dense_bias(table, index)), "flex, bias table": lambda: from_table}


def attention_runs(
    batch: int, tokens: int, heads: int, dim: int, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[dict, dict]:
    """The variants (name -> forward + backward) and each one's largest gradient difference from `sdpa`'s."""
    generator = torch.Generator().manual_seed(0)
    side = round((tokens - 1) ** 0.5)
    index = BeitRelativePositionBias.generate_relative_position_index((side, side)).to(device)
    table = (0.1 * torch.randn(int(index.max()) + 1, heads, generator=generator)).to(device).requires_grad_()
    query, key, value = (
        torch.randn(batch, heads, tokens, dim, generator=generator).to(device, dtype).requires_grad_() for _ in range(3)
    )
    gradient = torch.randn(batch, heads, tokens, dim, generator=generator).to(device, dtype)
    leaves = (query, key, value, table)

    def sdpa():
        bias = dense_bias(table, index).to(dtype)
        F.scaled_dot_product_attention(query, key, value, attn_mask=bias).backward(gradient)

    def biased():
        BiasedAttention.apply(query, key, value, dense_bias(table, index).to(dtype), dim**-0.5).backward(gradient)

    frozen = dense_bias(table, index).detach().to(dtype)

    def flash_frozen_bias():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(query, key, value, attn_mask=frozen).backward(gradient)

    runs = {"sdpa": sdpa, "bias in baddbmm": biased}
    if torch.device(device).type == "cpu":
        runs["flash, frozen bias"] = flash_frozen_bias
    else:
        from torch.nn.attention.flex_attention import flex_attention

        compiled = torch.compile(flex_attention, dynamic=False)
        for name, score_mod in flex_score_mods(table, index).items():
            runs[name] = lambda score_mod=score_mod: compiled(query, key, value, score_mod=score_mod()).backward(gradient)

    # A variant must compute what SDPA computes (frozen: all but the table's gradient) before its time means anything.
    gradients = {}
    for name, run in runs.items():
        for tensor in leaves:
            tensor.grad = None
        run()
        gradients[name] = [None if tensor.grad is None else tensor.grad.float().clone() for tensor in leaves]
    errors = {
        name: max((a - b).abs().max().item() for a, b in zip(gradients["sdpa"], grads) if b is not None)
        for name, grads in gradients.items()
        if name != "sdpa"
    }
    return runs, errors


def projection_runs(tokens: int, hidden: int, device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    generator = torch.Generator().manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, generator=generator).to(device, dtype).requires_grad_()

    inputs = leaf(tokens, hidden)
    weights = [leaf(hidden, hidden) for _ in range(3)]
    query_bias, value_bias = (torch.zeros(hidden, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
    gradient = torch.randn(tokens, 3 * hidden, generator=generator).to(device, dtype)

    def three_linears():
        outputs = [F.linear(inputs, weights[0], query_bias), F.linear(inputs, weights[1]), F.linear(inputs, weights[2], value_bias)]
        torch.cat(outputs, dim=-1).backward(gradient)

    def one_fused():
        fused_bias = torch.cat([query_bias, torch.zeros_like(query_bias), value_bias])
        F.linear(inputs, torch.cat(weights), fused_bias).backward(gradient)

    return {"q, k, v separate": three_linears, "fused qkv": one_fused}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--heads", type=int, default=3, help="Heads of 64 (3: ViT-Tiny, 12: ViT-Base)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2, help="Untimed calls first (FlexAttention compiles in the first)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="Of the queries, keys, values, inputs")
    parser.add_argument("--output", default="bench_attention.json")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    tokens, dim, dtype = 197, 64, DTYPES[args.dtype]  # 14 x 14 patches of 16 px at 224 px, and [CLS]

    attention, errors = attention_runs(args.batch_size, tokens, args.heads, dim, args.device, dtype)
    for name, error in errors.items():
        print(f"{name} vs sdpa: max |gradient difference| {error:.2e}")
    projections = projection_runs(args.batch_size * tokens, args.heads * dim, args.device, dtype)
    results = {"environment": environment(), "arguments": vars(args), "max_gradient_difference": errors}
    rows = []
    for group, runs, baseline in (("attention", attention, "sdpa"), ("qkv projection", projections, "q, k, v separate")):
        timings = time_interleaved(runs, repeats=args.repeats, warmup=args.warmup, log=lambda line: None,
                                   synchronize=device_synchronizer(args.device))  # fmt: skip
        results[group] = {}
        for name, timing in timings.items():
            ratio = paired_ratios(timings[baseline], timing)
            summary = timing.summary()
            results[group][name] = {"timing": summary, "speed_up": ratio}
            rows.append([group, name, f"{1000 * summary['wall']['min_s']:.2f}", f"{1000 * summary['wall']['median_s']:.2f}",
                         f"{ratio['wall']['best']:.2f}", f"{ratio['wall']['median']:.2f} ({ratio['wall']['min']:.2f}-{ratio['wall']['max']:.2f})"])  # fmt: skip
    print(markdown_table(["part", "variant", "fastest ms", "median ms", "speed-up, fastest", "speed-up per repeat"], rows))
    write_json(args.output, results)


if __name__ == "__main__":
    main()
