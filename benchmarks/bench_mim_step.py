#!/usr/bin/env python
"""MIM training-step speed and memory: every method of `hf_mim.families.MIM_METHODS` against transformers'
`BeitForMaskedImageModeling` with the equivalent configuration, in the same process.

    python benchmarks/bench_mim_step.py --output mim_step.json
    python benchmarks/bench_mim_step.py --sizes tiny base --batch_size 8 --repeats 5 --output mim_step_base.json
    python benchmarks/bench_mim_step.py --device cuda --sizes base --batch_size 128 --dtypes bf16 --full_step \
        --repeats 20 --warmup 3 --output mim_step_gpu.json

A step is forward + backward + AdamW (fused, `Trainer`'s default) at 224 px, in fp32 and under bf16 autocast. Each
method and its baseline get the same batch: the same pixels, the method's default masks (pre-training's mask
generators), the same precomputed targets (token ids, or tokenizer logits for soft-target methods), so tokenizer cost
is left out here (`bench_tokenizers.py` measures it), and the same initial weights (the baseline loads the method's
backbone, final LayerNorm and LM head). Steps are timed interleaved after warm-up; the speed-up is baseline time /
method time, of the fastest runs (other processes only ever add time) and per repeat (median and range). Before
timing, the BEiT model and its baseline must give the same loss on the same batch in eval mode, which checks that the
configurations are equivalent.

Peak memory: each (model, precision) is rebuilt in a new process (forked from a fork server that only imported
the libraries), and the figure is that process's RSS high-water mark (`getrusage`) after a warm-up step and a timed
step, minus its RSS before the first step (model and inputs built): gradients, AdamW states, activations and
allocator caches, not the weights.

FLOP/s: the FLOPs of one step are counted by `torch.utils.flop_counter.FlopCounterMode` (matrix products, convolution,
attention; not elementwise work) and divided by the step time; the machine's peak is the rate of a 2048 x 2048 fp32
matrix product with the same threads, timed interleaved with the steps, so each repeat gives a fraction of the peak
under the same load (median and range reported).

`--device cuda` runs everything on the GPU: the clocks wait for the device (`common.device_synchronizer`), peak memory
is the CUDA allocator's, and the peak is a bf16 8192 x 8192 product. `--full_step` adds the targets to the step: each
method holds its paper's tokenizer (`PAPER_TOKENIZERS`, default size, random weights) and computes its targets from
the tokenizer's view inside the step, as pre-training does; the baseline, the eager reference, runs the same tokenizer
(same weights, float32) before transformers' BEiT.
"""

import argparse
import inspect
import json
from types import SimpleNamespace

import numpy as np
import torch
from transformers import BeitConfig, BeitForMaskedImageModeling

from common import (
    count_flops,
    device_synchronizer,
    environment,
    in_subprocess,
    markdown_table,
    fraction_of_peak,
    measure_peak_cuda_memory,
    measure_peak_memory,
    paired_ratios,
    peak_probe,
    random_tokenizer,
    set_threads,
    time_interleaved,
    write_json,
)
from hf_mim.data import build_mask_generator
from hf_mim.families import MIM_METHODS, TOKENIZERS
from hf_mim.training.pretraining import MODEL_SIZES, DataArguments, build_replacement_generator

BASELINE = "transformers"
# What the memory subprocesses' fork server imports once.
PRELOAD = ("torch", "transformers", "hf_mim.training.pretraining", "common")
# The tokenizer each method's paper trains with (mc-BEiT: a VQGAN), for --full_step.
PAPER_TOKENIZERS = {"beit": "dvae", "beitv2": "vqkd", "mcbeit": "vqgan", "ccvit": "kmeans"}
BACKBONE_ONLY = "beit backbone only"
DTYPES = {"fp32": None, "bf16": torch.bfloat16}
# BeitConfig fields that do not describe the network.
_NOT_ARCHITECTURE = {"model_type", "architectures", "auto_map", "transformers_version", "dtype", "torch_dtype"}


def method_config(method: str, size: str, args):
    """The method's config at a ViT size of `MODEL_SIZES`, with its default recipe otherwise; with `--full_step` it
    holds its paper's tokenizer (default size) and predicts that tokenizer's codebook."""
    tokenizer_fields = {}
    if args.full_step:
        tokenizer = TOKENIZERS[PAPER_TOKENIZERS[method]].config_class()
        tokenizer_fields = {"tokenizer_config": tokenizer.to_dict(), "vocab_size": tokenizer.codebook_size}
    try:
        return MIM_METHODS[method].config_class(
            **MODEL_SIZES[size], image_size=args.image_size, patch_size=args.patch_size, **tokenizer_fields
        )
    except ValueError as error:  # the config checks the patch grid, and the tokenizer's grid against it
        raise SystemExit(f"{method}: {error} (set with --image_size / --patch_size)") from None


def baseline_config(config) -> BeitConfig:
    """transformers' `BeitConfig` with every architecture field of `config` (shared relative position bias, layer
    scale, mask token, LayerNorm eps, drop path, vocabulary)."""
    fields = {k: v for k, v in config.to_dict().items() if k in BeitConfig().to_dict() and k not in _NOT_ARCHITECTURE}
    return BeitConfig(**fields)


class TokenizedBaseline(torch.nn.Module):
    """The eager reference of a full step: the frozen tokenizer's ids of the masked patches (float32, no gradient),
    then transformers' BEiT on them. Without a separate tokenizer view (CCViT) the tokenizer reads `pixel_values`."""

    def __init__(self, model: BeitForMaskedImageModeling, tokenizer):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer.requires_grad_(False).eval()

    def train(self, mode: bool = True):
        self.model.train(mode)
        return self

    def forward(self, pixel_values, bool_masked_pos, tokenizer_pixel_values=None):
        view = pixel_values if tokenizer_pixel_values is None else tokenizer_pixel_values
        with torch.no_grad(), torch.autocast(view.device.type, enabled=False):
            labels = self.tokenizer.get_codebook_indices(view)
        return self.model(pixel_values=pixel_values, bool_masked_pos=bool_masked_pos, labels=labels[bool_masked_pos])


def build_model(method: str, size: str, args, seed: int):
    """The method's model on `args.device`, or with `method=(BASELINE, of_method)` transformers' BEiT with the same
    initial weights (and tokenizer, with `--full_step`)."""
    of_method = method[1] if isinstance(method, tuple) else method
    torch.manual_seed(seed)
    model_class = MIM_METHODS[of_method].model_class
    model = model_class(method_config(of_method, size, args))
    if args.full_step:
        model.set_tokenizer(random_tokenizer(PAPER_TOKENIZERS[of_method]))
    if isinstance(method, tuple):
        baseline = BeitForMaskedImageModeling(baseline_config(model.config))
        missing, _ = baseline.load_state_dict(model.state_dict(), strict=False)
        if missing:
            raise RuntimeError(f"The baseline shares no weights named {missing} with {of_method}")
        model = TokenizedBaseline(baseline, model.tokenizer) if args.full_step else baseline
    return model.to(args.device).train()


def mask_generators(method: str, grid: int):
    """The method's default mask generator and replacement-position generator (None if it replaces no patches)."""
    data_args = MIM_METHODS[method].with_data_defaults(DataArguments())
    return build_mask_generator(data_args, grid), build_replacement_generator(data_args, MIM_METHODS[method], grid)


def make_batch(method: str, config, batch_size: int, seed: int, device: str = "cpu") -> dict:
    """Pixels in [0, 1], masks from the method's default generators, per-patch token ids and tokenizer logits, on
    `device`; for a config holding a tokenizer, no targets but the tokenizer's view (random pixels in [0, 1]), unless
    the method reads that view from `pixel_values` (CCViT)."""
    grid = config.image_size // config.patch_size
    generator, replacer = mask_generators(method, grid)
    rng = np.random.default_rng(seed)
    masks = np.stack([generator(rng) for _ in range(batch_size)])
    batch = {"bool_masked_pos": torch.from_numpy(masks.reshape(batch_size, -1))}
    if replacer is not None:
        replaced = np.stack([replacer(mask, rng) for mask in masks])
        batch["bool_replaced_pos"] = torch.from_numpy(replaced.reshape(batch_size, -1))
    torch.manual_seed(seed)
    batch["pixel_values"] = torch.rand(batch_size, 3, config.image_size, config.image_size)
    batch["labels"] = torch.randint(0, config.vocab_size, (batch_size, grid * grid))
    batch["tokenizer_logits"] = torch.randn(batch_size, grid * grid, config.vocab_size)
    if config.tokenizer_config is not None:
        size = config.tokenizer_config["image_size"]
        batch = {k: v for k, v in batch.items() if k not in ("labels", "tokenizer_logits")}
        if not MIM_METHODS[method].reads_tokenizer_view:
            batch["tokenizer_pixel_values"] = torch.rand(batch_size, 3, size, size)
    return {key: value.to(device) for key, value in batch.items()}


def model_inputs(model, batch: dict) -> dict:
    """The part of `batch` the model's forward takes; transformers' BEiT gets the masked positions' labels."""
    if isinstance(model, BeitForMaskedImageModeling):
        mask = batch["bool_masked_pos"]
        return {"pixel_values": batch["pixel_values"], "bool_masked_pos": mask, "labels": batch["labels"][mask]}
    accepted = inspect.signature(model.forward).parameters
    inputs = {k: v for k, v in batch.items() if k in accepted}
    if "tokenizer_logits" in inputs:
        inputs.pop("labels", None)
    return inputs


def training_step(model, inputs: dict, optimizer, dtype: str):
    autocast = DTYPES[dtype]
    device_type = next(model.parameters()).device.type

    def step():
        with torch.autocast(device_type, dtype=autocast or torch.float32, enabled=autocast is not None):
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def make_optimizer(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.05, fused=True)


def _memory_probe(method, size: str, dtype: str, args, seed: int) -> dict:
    """Peak memory growth of a warm-up step and a timed step: on a CPU run in a fresh process (RSS), on a GPU in
    this one (the CUDA allocator's peak)."""
    if torch.device(args.device).type != "cuda":
        set_threads(args.threads)

    def prepare():
        model = build_model(method, size, args, seed)
        of_method = method[1] if isinstance(method, tuple) else method
        batch = make_batch(of_method, method_config(of_method, size, args), args.batch_size, seed, args.device)
        return training_step(model, model_inputs(model, batch), make_optimizer(model), dtype)

    if torch.device(args.device).type == "cuda":
        return measure_peak_cuda_memory(prepare, calls=2)
    return measure_peak_memory(prepare, calls=2)


def check_equivalence(model, baseline, batch: dict) -> float:
    """Absolute difference of the two eval-mode losses on `batch` (the BEiT model and its baseline must agree)."""
    model.eval(), baseline.eval()
    with torch.no_grad():
        ours = model(**model_inputs(model, batch)).loss.item()
        theirs = baseline(**model_inputs(baseline, batch)).loss.item()
    model.train(), baseline.train()
    if abs(ours - theirs) > 1e-4 * max(1.0, abs(theirs)):
        raise RuntimeError(f"BEiT and transformers' BEiT disagree on the same batch: loss {ours} vs {theirs}")
    return abs(ours - theirs)


class BackboneOnly(torch.nn.Module):
    """BEiT's step without LM head and cross-entropy (a trivial loss on the masked patches' features): the time no
    optimisation of the head or the loss can go below, so baseline time / its time bounds BEiT's speed-up."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor) -> SimpleNamespace:
        hidden_states = self.model.forward_features(pixel_values, bool_masked_pos).last_hidden_state
        return SimpleNamespace(loss=hidden_states[:, 1:][bool_masked_pos].float().square().mean())


def run_group(methods: list[str], size: str, args) -> dict:
    """Time the methods sharing one baseline (same masks and backbone config) interleaved with that baseline."""
    first = methods[0]
    models = {m: build_model(m, size, args, args.seed) for m in methods}
    models[BASELINE] = build_model((BASELINE, first), size, args, args.seed)
    batch = make_batch(first, models[first].config, args.batch_size, args.seed, args.device)
    result = {"methods": methods, "models": {}}
    if "beit" in methods:
        result["beit_loss_difference"] = check_equivalence(models["beit"], models[BASELINE], batch)
        print(f"  beit and {BASELINE} agree on the eval loss (|difference| {result['beit_loss_difference']:.2g})")
        if not args.full_step:  # the bound is of the model part; a full step's tokenizer is not in it
            models[BACKBONE_ONLY] = BackboneOnly(build_model("beit", size, args, args.seed)).train()
    peak_name, (probe, probe_flops) = peak_probe(args.device)
    steps = {peak_name: probe}
    for name, model in models.items():
        inputs, optimizer = model_inputs(model, batch), make_optimizer(model)
        flops = count_flops(training_step(model, inputs, optimizer, "fp32"))
        result["models"][name] = {"parameters": sum(p.numel() for p in model.parameters()), "flops_per_step": flops}
        for dtype in args.dtypes:
            steps[f"{name}/{dtype}"] = training_step(model, inputs, optimizer, dtype)
    timings = time_interleaved(steps, args.repeats, args.warmup, synchronize=device_synchronizer(args.device))
    peak = timings.pop(peak_name)
    result["matmul_peak"] = {"probe": peak_name, **peak.summary(items=probe_flops)}
    for key, timing in timings.items():
        name, dtype = key.split("/")
        entry = result["models"][name].setdefault(dtype, {})
        entry["timing"] = timing.summary(items=args.batch_size)
        entry["speedup_vs_transformers"] = paired_ratios(timings[f"{BASELINE}/{dtype}"], timing)
        flops = result["models"][name]["flops_per_step"]
        entry["fraction_of_matmul_peak"] = fraction_of_peak(flops, timing, probe_flops, peak)
        if not args.no_memory and name != BACKBONE_ONLY:
            probe = (BASELINE, first) if name == BASELINE else name
            if torch.device(args.device).type == "cuda":
                entry["memory"] = _memory_probe(probe, size, dtype, args, args.seed)
            else:
                entry["memory"] = in_subprocess(_memory_probe, probe, size, dtype, args, args.seed, preload=PRELOAD)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny"], choices=list(MODEL_SIZES), help="ViT sizes (pre-training's)")
    parser.add_argument("--methods", nargs="+", default=None, help=f"Subset of {list(MIM_METHODS)} (default: all)")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--patch_size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5, help="Timed steps of every model, interleaved")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed steps of every model first")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (default 1: repeatable on a shared machine; use all cores on a dedicated one)",
    )
    parser.add_argument("--no_memory", action="store_true", help="Skip the peak-memory subprocesses")
    parser.add_argument("--device", default="cpu", help="Where the steps run: cpu, cuda, cuda:1 ...")
    parser.add_argument(
        "--full_step", action="store_true",
        help="Targets from each method's paper tokenizer inside the step (PAPER_TOKENIZERS), not precomputed",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="bench_mim_step.json", help="Where to write the JSON results")
    args = parser.parse_args()
    methods = args.methods or list(MIM_METHODS)
    unknown = set(methods) - set(MIM_METHODS)
    if unknown:
        parser.error(f"unknown --methods {sorted(unknown)}; registered: {list(MIM_METHODS)}")

    set_threads(args.threads)
    results = {"environment": environment(), "config": {k: v for k, v in vars(args).items() if k != "output"}}
    results["sizes"] = {}
    for size in args.sizes:
        # Methods whose baseline (backbone config and masks) coincide share it.
        groups: dict[str, list[str]] = {}
        for method in methods:
            config = method_config(method, size, args)
            generators = mask_generators(method, config.image_size // config.patch_size)
            tokenizer = PAPER_TOKENIZERS[method] if args.full_step else None
            key = json.dumps(
                [baseline_config(config).to_dict(), *map(repr, generators), tokenizer], sort_keys=True, default=str
            )
            groups.setdefault(key, []).append(method)
        results["sizes"][size] = []
        for group in groups.values():
            print(f"ViT-{size}: {', '.join(group)} vs {BASELINE}, batch {args.batch_size}")
            results["sizes"][size].append(run_group(group, size, args))

    headers = ["size", "model", "dtype", "img/s", "img/s range", "img/s (CPU time)", "speed-up, fastest runs",
               "speed-up per repeat", "speed-up per repeat (CPU time)", "peak MiB", "GFLOP/step", "% matmul peak",
               "% peak (CPU time)"]
    rows = []
    for size, groups in results["sizes"].items():
        for group in groups:
            for name, model in group["models"].items():
                label = {
                    BASELINE: f"{BASELINE} (for {', '.join(group['methods'])})",
                    BACKBONE_ONLY: f"{BACKBONE_ONLY} (bound: no head, no loss)",
                }.get(name, name)
                for dtype in args.dtypes:
                    entry = model[dtype]
                    wall, cpu = entry["timing"]["wall"], entry["timing"]["cpu"]
                    speedup = entry["speedup_vs_transformers"]
                    fraction = entry["fraction_of_matmul_peak"]
                    rows.append([
                        size, label, dtype, wall["per_s"],
                        f"{args.batch_size / wall['max_s']:.3g}-{args.batch_size / wall['min_s']:.3g}", cpu["per_s"],
                        f"{speedup['wall']['best']:.2f} (CPU time {speedup['cpu']['best']:.2f})",
                        f"{speedup['wall']['median']:.2f} ({speedup['wall']['min']:.2f}-{speedup['wall']['max']:.2f})",
                        f"{speedup['cpu']['median']:.2f} ({speedup['cpu']['min']:.2f}-{speedup['cpu']['max']:.2f})",
                        f"{entry['memory']['peak_delta_mib']:.0f}" if "memory" in entry else "-",
                        model["flops_per_step"] / 1e9, f"{100 * fraction['wall']['median']:.0f}%",
                        f"{100 * fraction['cpu']['median']:.0f}%",
                    ])
    print()
    print(markdown_table(headers, rows))
    for size, groups in results["sizes"].items():
        for group in groups:
            if "beit" in group["methods"] and "fp32" in args.dtypes:
                speedup = group["models"]["beit"]["fp32"]["speedup_vs_transformers"]
                wall, cpu = speedup["wall"]["best"], speedup["cpu"]["best"]
                flop_ratio = group["models"][BASELINE]["flops_per_step"] / group["models"]["beit"]["flops_per_step"]
                verdict = "met" if min(wall, cpu) >= 1.5 else "missed"
                print(
                    f"Goal BEiT fp32 >= 1.5x transformers, ViT-{size}: {wall:.2f}x wall, {cpu:.2f}x CPU time, fastest "
                    f"runs ({verdict}); per-repeat median {speedup['wall']['median']:.2f}x wall; FLOP ratio "
                    f"transformers / beit {flop_ratio:.2f} (the speed-up at equal FLOP/s)"
                )
                if BACKBONE_ONLY in group["models"]:
                    bound = group["models"][BACKBONE_ONLY]["fp32"]["speedup_vs_transformers"]["wall"]["best"]
                    print(f"  Bound: the backbone alone (no LM head, no loss) runs {bound:.2f}x faster than transformers")
    write_json(args.output, results)


if __name__ == "__main__":
    main()
