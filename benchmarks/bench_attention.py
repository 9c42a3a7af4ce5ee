#!/usr/bin/env python
"""The two BEiT-layer optimisations that were tried for the MIM step goal and not kept, timed against what
transformers' `BeitModel` does, so anyone can check the "no gain" verdict in benchmarks/README.md.

    python benchmarks/bench_attention.py --output bench_attention.json

Attention (forward + backward of one ViT-Tiny layer's attention core, batch 8, 197 tokens, 3 heads of 64):
- `sdpa`: `F.scaled_dot_product_attention` with BEiT's relative position bias as the mask; the bias is trained, so
  it requires grad, and the CPU flash kernel refuses it: SDPA runs its math path (what transformers runs);
- `bias in baddbmm`: a hand-written autograd function adding the bias inside `baddbmm` and computing the bias
  gradient from the softmax gradient;
- `flash, frozen bias`: SDPA's CPU flash kernel with a bias that needs no gradient, the bound had the bias been
  frozen (BEiT's is not).
QKV projection (forward + backward on 8 x 197 tokens of 192): three `Linear`s (transformers' q/k/v_proj) against
one 192 -> 576 product.
"""

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from common import environment, markdown_table, paired_ratios, set_threads, time_interleaved, write_json


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


def attention_runs(batch: int, tokens: int, heads: int, dim: int) -> tuple[dict, float]:
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(batch, heads, tokens, dim, generator=generator, requires_grad=True) for _ in range(3))
    bias = (0.1 * torch.randn(1, heads, tokens, tokens, generator=generator)).requires_grad_()
    gradient = torch.randn(batch, heads, tokens, dim, generator=generator)

    def sdpa():
        F.scaled_dot_product_attention(query, key, value, attn_mask=bias).backward(gradient)

    def biased():
        BiasedAttention.apply(query, key, value, bias, dim**-0.5).backward(gradient)

    def flash_frozen_bias():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(query, key, value, attn_mask=bias.detach()).backward(gradient)

    # The hand-written function must compute what SDPA computes before its time means anything.
    outputs = []
    for run in (sdpa, biased):
        for tensor in (query, key, value, bias):
            tensor.grad = None
        run()
        outputs.append([tensor.grad.clone() for tensor in (query, key, value, bias)])
    error = max((a - b).abs().max().item() for a, b in zip(*outputs))
    return {"sdpa": sdpa, "bias in baddbmm": biased, "flash, frozen bias": flash_frozen_bias}, error


def projection_runs(tokens: int, hidden: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(tokens, hidden, generator=generator, requires_grad=True)
    weights = [torch.randn(hidden, hidden, generator=generator, requires_grad=True) for _ in range(3)]
    query_bias, value_bias = (torch.zeros(hidden, requires_grad=True) for _ in range(2))
    gradient = torch.randn(tokens, 3 * hidden, generator=generator)

    def three_linears():
        outputs = [F.linear(inputs, weights[0], query_bias), F.linear(inputs, weights[1]), F.linear(inputs, weights[2], value_bias)]
        torch.cat(outputs, dim=-1).backward(gradient)

    def one_fused():
        fused_bias = torch.cat([query_bias, torch.zeros(hidden), value_bias])
        F.linear(inputs, torch.cat(weights), fused_bias).backward(gradient)

    return {"q, k, v separate": three_linears, "fused qkv": one_fused}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default="bench_attention.json")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    tokens, heads, dim = 197, 3, 64  # ViT-Tiny/16 at 224 px

    attention, error = attention_runs(args.batch_size, tokens, heads, dim)
    print(f"bias in baddbmm vs sdpa: max |gradient difference| {error:.2e}")
    projections = projection_runs(args.batch_size * tokens, heads * dim)
    results, rows = {"environment": environment(), "max_gradient_difference": error}, []
    for group, runs, baseline in (("attention", attention, "sdpa"), ("qkv projection", projections, "q, k, v separate")):
        timings = time_interleaved(runs, repeats=args.repeats, warmup=2, log=lambda line: None)
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
