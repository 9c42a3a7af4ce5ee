"""The GPU check: every training entry point on real photos in bf16 for a short time budget, then evaluation, export
and visualisation, with the true images/s, the fraction of time the GPU was busy and the peak memory of each.

    python benchmarks/gpu_check.py --data <image folder> --output gpu_check.json

`--data` is an imagefolder (class sub-folders; `train/` and `val/` splits are used when present, e.g. the
Imagenette copy `imagenette_224/`). On one GPU it runs, each for `--seconds` of training (default 20): the dVAE and
VQ-KD tokenizers (VQ-KD distils a randomly initialised CLIP ViT-B/16 built here: no download), the k-means fit, then
`run_mim` for BEiT (dVAE targets), BEiT v2 (VQ-KD), mc-BEiT (dVAE logits) and CCViT (k-means), all ViT-B/16 at
224 px; then feature extraction and a linear probe of the BEiT encoder, its export to a transformers BEiT checkpoint
and the visualisation panels. With two or more GPUs it also runs BEiT under a 2-process NCCL launch and checks that
both ranks end with identical weights. It writes the JSON report (and nothing else) to `--output`, prints a
markdown table, and exits with 1 if any entry failed (the others still run).

`--dry_run` runs the same entries on the CPU with tiny models for a couple of steps each: the suite runs it, so the
check cannot rot between the times it is run on a GPU.

Per entry: `images_per_s` is what training actually processed (hf_mim's `train_samples_per_second`, from the
samples seen, not the planned steps) or, for feature extraction, images encoded per second; `gpu_busy` is the mean
NVML utilisation (the fraction of time a kernel ran) sampled every 50 ms while training ran (`train` window) and over
the whole entry (`entry`: model building, data loading, saving included); `peak_memory_gib` is torch's peak
allocated memory.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    BeitModel,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    TrainerCallback,
)

from hf_mim.evaluation.export import main as export_main
from hf_mim.evaluation.features import FeatureArguments, load_features
from hf_mim.evaluation.probe import linear_probe
from hf_mim.training import run_mim, train_tokenizer
from hf_mim.visualization import main as visualize_main

from common import environment, markdown_table, write_json

# Tiny models of --dry_run: a 32 px ViT with 8 px patches, and tokenizers whose grid matches it.
DRY_VIT = "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64"
DRY_TOKENIZERS = {
    "dvae": "image_size=16,hidden_size=8,num_groups=3,codebook_size=64,decoder_hidden_size=8",
    "vqkd": (
        "image_size=32,patch_size=8,hidden_size=32,num_hidden_layers=1,num_attention_heads=2,intermediate_size=64,"
        "decoder_hidden_size=32,decoder_layers=1,decoder_attention_heads=2,decoder_intermediate_size=64,"
        "codebook_size=64,codebook_dim=8,teacher_dim=16"
    ),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="Image folder (class sub-folders; train/ and val/ if present)")
    parser.add_argument("--output", required=True, help="Where to write the JSON report")
    parser.add_argument("--seconds", type=float, default=20.0, help="Training budget of each training entry point")
    parser.add_argument("--batch_size", type=int, default=128, help="Per-device batch of the training entry points")
    parser.add_argument(
        "--num_workers", type=int, default=None, help="DataLoader workers (default: the CPU count minus 2, at most 14)"
    )
    parser.add_argument("--work_dir", default=None, help="Where the entry points write (default: a temporary folder)")
    parser.add_argument("--dry_run", action="store_true", help="CPU, tiny models, two steps per entry")
    parser.add_argument("--ddp_worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not os.path.isdir(args.data):
        parser.error(f"--data {args.data} is not a folder of images")
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device is visible: run the GPU check on a GPU machine, or pass --dry_run")
    if args.num_workers is None:
        args.num_workers = 0 if args.dry_run else max(0, min(14, (os.cpu_count() or 2) - 2))
    return args


def splits(data: str) -> tuple[str, str | None]:
    """The training folder and, when the data has one, the validation folder."""
    train = os.path.join(data, "train")
    if not os.path.isdir(train):
        return data, None
    for name in ("val", "validation", "test"):
        if os.path.isdir(os.path.join(data, name)):
            return train, os.path.join(data, name)
    return train, None


class GpuBusySampler:
    """Samples NVML's GPU utilisation every `interval` seconds in a thread; `mean(start, end)` averages a window."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.samples = interval, []
        self._stop = threading.Event()
        self._read = self._nvml_reader()
        self._thread = threading.Thread(target=self._run, daemon=True) if self._read else None

    @staticmethod
    def _nvml_reader():
        if not torch.cuda.is_available():
            return None
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
            return lambda: pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
        except Exception:  # no NVML: torch's own reader, if it has one
            return lambda: torch.cuda.utilization()

    def _run(self):
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic(), self._read()))
            except Exception:  # no reading at all: the report shows no GPU-busy figure rather than a wrong one
                return
            time.sleep(self.interval)

    def __enter__(self):
        if self._thread:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread:
            self._thread.join()

    def mean(self, start: float | None = None, end: float | None = None) -> float | None:
        values = [u for t, u in self.samples if (start is None or t >= start) and (end is None or t <= end)]
        return round(sum(values) / (100 * len(values)), 3) if values else None


class TrainWindow(TrainerCallback):
    """When training itself began and ended (model building, data loading and saving excluded)."""

    start = end = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.monotonic()

    def on_train_end(self, args, state, control, **kwargs):
        self.end = time.monotonic()


class GpuCheck:
    def __init__(self, args):
        self.args = args
        self.work_dir = args.work_dir or tempfile.mkdtemp(prefix="gpu_check_")
        self.train_dir, self.validation_dir = splits(args.data)
        self.entries: list[dict] = []
        self.folders: dict[str, str] = {}

    def path(self, name: str) -> str:
        return os.path.join(self.work_dir, name)

    def fit_flags(self, output_dir: str) -> list[str]:
        """The flags of a run; a k-means fit takes only these (it refuses optimisation flags, which it would ignore)."""
        flags = [
            "--output_dir", output_dir, "--overwrite_output_dir", "--do_train", "--train_dir", self.train_dir,
            "--dataloader_num_workers", str(self.args.num_workers), "--report_to", "none", "--seed", "0",
            "--disable_tqdm", "true",
        ]  # fmt: skip
        return [*flags, "--use_cpu"] if self.args.dry_run else flags

    def training_flags(self, output_dir: str) -> list[str]:
        flags = [
            *self.fit_flags(output_dir), "--per_device_train_batch_size", str(self.args.batch_size), "--bf16",
            "--learning_rate", "1e-4", "--lr_scheduler_type", "constant_with_warmup", "--warmup_steps", "10",
            "--logging_steps", "10", "--save_strategy", "no",
        ]  # fmt: skip
        if self.args.dry_run:
            return [*flags, "--max_steps", "2", "--per_device_train_batch_size", "4"]
        return [*flags, "--max_steps", "100000", "--max_train_seconds", str(self.args.seconds)]

    def run(self, name: str, function, *args) -> dict | None:
        """Run one entry, measure it, record it; a failure is recorded (with its traceback) and the check goes on."""
        window = TrainWindow()
        entry = {"entry": name, "status": "ok"}
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        print(f"\n=== {name}", flush=True)
        start = time.monotonic()
        result = None
        with GpuBusySampler() as sampler:
            try:
                result = function(window, *args)
            except Exception as error:  # the report says what failed; the remaining entries still run
                entry.update(status="failed", error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc()[-3000:])
                print(entry["traceback"], flush=True)
        entry["wall_s"] = round(time.monotonic() - start, 2)
        entry["gpu_busy"] = {"train": sampler.mean(window.start, window.end), "entry": sampler.mean()}
        if torch.cuda.is_available():
            entry["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if isinstance(result, dict):
            entry.update(result)
        self.entries.append(entry)
        print({key: value for key, value in entry.items() if key != "traceback"}, flush=True)
        # Written after every entry: a check stopped at its time limit still reports the entries it finished.
        self.write_report()
        return result

    def write_report(self, multi_gpu: dict | None = None) -> None:
        write_json(self.args.output, {
            "environment": environment(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "settings": {key: value for key, value in vars(self.args).items() if key != "ddp_worker"},
            "entries": self.entries,
            "multi_gpu": multi_gpu,
        })  # fmt: skip

    def training_result(self, metrics: dict) -> dict:
        keys = ("train_runtime", "train_samples", "train_steps", "train_samples_per_second")
        result = {key: metrics.get(key) for key in keys}
        result["images_per_s"] = metrics.get("train_samples_per_second")
        return result

    # The entries, in the order they run (later ones use earlier outputs).

    def dvae(self, window):
        folder = self.folders["dvae"] = self.path("dvae")
        overrides = ["--config_overrides", DRY_TOKENIZERS["dvae"]] if self.args.dry_run else []
        flags = ["--tokenizer_type", "dvae", *overrides, *self.training_flags(folder)]
        return self.training_result(train_tokenizer.main(flags, callbacks=[window]))

    def vqkd(self, window):
        teacher = self.random_clip_teacher(self.path("clip_teacher"))
        folder = self.folders["vqkd"] = self.path("vqkd")
        overrides = DRY_TOKENIZERS["vqkd"] if self.args.dry_run else "teacher_dim=512"
        flags = [
            "--tokenizer_type", "vqkd", "--teacher_name_or_path", teacher, "--config_overrides", overrides,
            *self.training_flags(folder),
        ]  # fmt: skip
        return self.training_result(train_tokenizer.main(flags, callbacks=[window]))

    def random_clip_teacher(self, folder: str) -> str:
        """A randomly initialised CLIP vision tower with projection (ViT-B/16 at 224 px; tiny in --dry_run)."""
        if self.args.dry_run:
            config = CLIPVisionConfig(
                hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                patch_size=8, projection_dim=16,
            )  # fmt: skip
        else:
            config = CLIPVisionConfig(image_size=224, patch_size=16, projection_dim=512)
        torch.manual_seed(0)
        CLIPVisionModelWithProjection(config).save_pretrained(folder)
        side = config.image_size
        CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}).save_pretrained(folder)
        return folder

    def kmeans(self, window):
        folder = self.folders["kmeans"] = self.path("kmeans")
        overrides = "image_size=32,patch_size=8,codebook_size=16" if self.args.dry_run else "codebook_size=8192"
        flags = ["--tokenizer_type", "kmeans", "--config_overrides", overrides, *self.fit_flags(folder)]
        start = time.monotonic()
        window.start = start
        metrics = train_tokenizer.main(flags)
        window.end = time.monotonic()
        # The fit's own time (patch sampling excluded) and its size: the CCViT-scale figure of the GPU speed issue.
        return {"fit_s": round(window.end - start, 2), "kmeans_runtime": metrics.get("train_runtime"),
                "num_patches": metrics.get("train_num_patches")}

    def mim(self, window, method: str, tokenizer: str):
        folder = self.folders[method] = self.path(method)
        size = ["--model_size", "tiny", "--image_size", "32", "--patch_size", "8", "--config_overrides", DRY_VIT]
        flags = [
            "--model_type", method, "--tokenizer_name_or_path", self.folders[tokenizer],
            *(size if self.args.dry_run else ["--model_size", "base"]), *self.training_flags(folder),
        ]  # fmt: skip
        return self.training_result(run_mim.main(flags, callbacks=[window]))

    def probe(self, window):
        feature_args = FeatureArguments(
            model_name_or_path=self.folders["beit"], train_dir=self.train_dir, validation_dir=self.validation_dir,
            train_val_split=0.0 if self.validation_dir else 0.25, batch_size=64 if self.args.dry_run else 256,
            num_workers=self.args.num_workers,
        )  # fmt: skip
        window.start = start = time.monotonic()
        train, evaluation = load_features(feature_args)
        encoded = time.monotonic() - start
        window.end = time.monotonic()
        result = linear_probe(next(iter(train.features.values())), train.labels, next(iter(evaluation.features.values())), evaluation.labels)
        images = len(train.labels) + len(evaluation.labels)
        return {
            "images": images, "features_s": round(encoded, 2), "images_per_s": round(images / encoded, 1),
            "linear_probe_top1": round(result.accuracy, 4), "probe_s": round(time.monotonic() - window.end, 2),
        }  # fmt: skip

    def export(self, window):
        folder = export_main(["--model_name_or_path", self.folders["beit"], "--output_dir", self.path("export")])
        model = BeitModel.from_pretrained(folder)
        device = "cpu" if self.args.dry_run else "cuda"
        side = model.config.image_size
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
            output = model.to(device)(torch.randn(2, 3, side, side, device=device)).last_hidden_state
        if not torch.isfinite(output).all():
            raise FloatingPointError("the exported BEiT gives non-finite features")
        return {"exported_to": folder}

    def visualize(self, window):
        images = sorted(os.path.join(root, name) for root, _, names in os.walk(self.validation_dir or self.train_dir) for name in names)[:4]
        written = visualize_main([
            "--model_name_or_path", self.folders["beit"], "--tokenizer_name_or_path", self.folders["dvae"],
            "--images", *images, "--output_dir", self.path("figures"),
        ])  # fmt: skip
        return {"figures": sorted(written) if isinstance(written, dict) else None}

    def ddp(self, window):
        """BEiT under `accelerate launch --multi_gpu --num_processes 2` (NCCL); both ranks' weights must be equal."""
        folder = self.path("beit_ddp")
        flags = [
            "--model_type", "beit", "--tokenizer_name_or_path", self.folders["dvae"], "--model_size", "base",
            *self.training_flags(folder),
        ]  # fmt: skip
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            os.path.abspath(__file__), "--data", self.args.data, "--output", self.args.output, "--ddp_worker",
            json.dumps(flags),
        ]  # fmt: skip
        subprocess.run(command, check=True)
        ranks = [load_file(os.path.join(folder, f"rank_{rank}.safetensors")) for rank in range(2)]
        differing = [name for name in ranks[0] if not torch.equal(ranks[0][name], ranks[1][name])]
        if differing:
            raise AssertionError(f"{len(differing)} tensors differ between ranks, e.g. {differing[:3]}")
        metrics = json.load(open(os.path.join(folder, "train_results.json")))
        return {**self.training_result(metrics), "identical_weights": True}

    def run_all(self) -> int:
        self.run("train_tokenizer dvae", self.dvae)
        self.run("train_tokenizer vqkd", self.vqkd)
        self.run("train_tokenizer kmeans", self.kmeans)
        for method, tokenizer in (("beit", "dvae"), ("beitv2", "vqkd"), ("mcbeit", "dvae"), ("ccvit", "kmeans")):
            if tokenizer in self.folders:
                self.run(f"run_mim {method}", self.mim, method, tokenizer)
        if "beit" in self.folders:
            self.run("features + linear probe", self.probe)
            self.run("export", self.export)
            self.run("visualize", self.visualize)
        gpus = torch.cuda.device_count()
        multi_gpu = {"gpus": gpus, "status": "skipped: fewer than 2 GPUs"}
        if gpus >= 2 and "dvae" in self.folders:
            self.run("run_mim beit, 2-process NCCL", self.ddp)
            multi_gpu["status"] = self.entries[-1]["status"]
        self.write_report(multi_gpu)
        print("\n" + table(self.entries))
        failed = [entry["entry"] for entry in self.entries if entry["status"] != "ok"]
        if failed:
            print(f"FAILED: {', '.join(failed)}", flush=True)
        return 1 if failed else 0


def table(entries: list[dict]) -> str:
    def cell(value, scale=1.0, digits=0):
        return "-" if value is None else f"{value * scale:,.{digits}f}"

    rows = [
        [
            entry["entry"], entry["status"], cell(entry.get("images_per_s")),
            cell(entry["gpu_busy"]["train"], 100), cell(entry["gpu_busy"]["entry"], 100),
            cell(entry.get("peak_memory_gib"), digits=1), cell(entry["wall_s"], digits=1),
        ]
        for entry in entries
    ]  # fmt: skip
    headers = ["entry", "status", "images/s", "GPU busy, training %", "GPU busy, entry %", "peak GiB", "wall s"]
    return markdown_table(headers, rows)


class SaveRankWeights(TrainerCallback):
    """Each rank of the DDP entry writes its final weights, for the identical-replicas check."""

    def on_train_end(self, args, state, control, model=None, **kwargs):
        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
        save_file(tensors, os.path.join(args.output_dir, f"rank_{os.environ.get('RANK', '0')}.safetensors"))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.ddp_worker is not None:
        run_mim.main(json.loads(args.ddp_worker), callbacks=[SaveRankWeights()])
        return 0
    if not args.dry_run:
        torch.backends.cuda.matmul.allow_tf32 = True
    return GpuCheck(args).run_all()


if __name__ == "__main__":
    sys.exit(main())
