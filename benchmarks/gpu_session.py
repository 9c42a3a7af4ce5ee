#!/usr/bin/env python
"""Every GPU measurement of issue 17 and the GPU check, in one call of a lent GPU machine, within a time plan.

A session is lent at most 15 minutes of device time, start-up included, and gets at most 8 files back, so the runs
are prepared here and made there in one command:

    python benchmarks/gpu_session.py prepare --photos ../shared/data/imagenette_224_subset.tar   # here, once
    # device call, carrying .gpu_kit (a git-ignored folder: the wheels the GPU machine lacks, and the photos):
    python3 benchmarks/gpu_session.py run --output $OUT --budget 550

`prepare` downloads Python 3.12 wheels of the packages the GPU machine lacks (the versions installed here) and copies
the photos. `run` installs the wheels into a folder of its own, puts `src` on PYTHONPATH, extracts the photos and runs
the steps of `plan` in order, each under its own time limit and the whole under `--budget` seconds: a step that fails
or runs out of time is reported and the next one runs. It writes each step's JSON and `session.log` (every step's
command, status, seconds and output) to `--output`. `run --dry_run` makes every step small and runs it on the CPU
(`tests/test_benchmarks.py`).
"""

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCHMARKS)

# What the GPU machine's image lacks of hf_mim's dependencies (it has torch, transformers, accelerate, pyarrow,
# xxhash, fsspec, scikit-learn: /work/.library/device/KINDS.md); its Python is 3.12.
MISSING_ON_DEVICE = ("datasets", "evaluate", "dill", "multiprocess")
DEVICE_PYTHON = "3.12"
MANYLINUX = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
# A step given less than this (what the budget has left) is skipped: it would only start up and be stopped.
MINIMUM_STEP_SECONDS = 30


@dataclass
class Step:
    """One command of the session: its name, the most seconds it may take, its arguments after `python`, and the
    file it writes (None for none)."""

    name: str
    seconds: int
    argv: list[str]
    output: str | None = None


def plan(data: str, output: str, dry_run: bool = False) -> list[Step]:
    """The session's steps, most wanted first: the GPU check of every entry point, then issue 17's goals 1 and 2
    (the full step with each method's tokenizer against the eager reference, the tokenizers alone with their ids
    against fp32's), goal 3 (k-means in bf16 against fp32 from the same centroids, then at CCViT's scale),
    goal 6 (FlexAttention against SDPA with the trainable bias, a ViT-Base layer) and goal 1's model part with targets
    precomputed (fraction of the bf16 peak). The limits add up to 550 s, the default budget."""

    def out(name: str) -> str:
        return os.path.join(output, name)

    def script(name: str) -> str:
        return os.path.join(BENCHMARKS, name)

    if dry_run:
        gpu = ["--device", "cpu"]
        mim_step = ["--sizes", "tiny", "--batch_size", "2", "--dtypes", "fp32", "--repeats", "1", "--warmup", "0",
                    "--no_memory", "--methods", "beit", *gpu]  # fmt: skip
        tokenizers = ["--batch_size", "1", "--dtypes", "fp32", "bf16", "--repeats", "1", "--warmup", "0",
                      "--families", "hf_mim_kmeans", *gpu]  # fmt: skip
        kmeans = ["--num_clusters", "16", "--num_iterations", "2", *gpu]
        patches, ccvit_patches, check = "2000", "4000", ["--dry_run"]
        attention = ["--repeats", "1", "--warmup", "0", *gpu]
    else:
        gpu = ["--device", "cuda"]
        mim_step = ["--sizes", "base", "--batch_size", "128", "--dtypes", "bf16", "--repeats", "10", "--warmup", "3",
                    "--no_memory", *gpu]  # fmt: skip
        tokenizers = ["--batch_size", "256", "--dtypes", "fp32", "bf16", "--repeats", "5", "--warmup", "2", *gpu]
        kmeans = ["--num_clusters", "8192", "--num_iterations", "20", *gpu]
        patches, ccvit_patches, check = "1000000", "9800000", ["--seconds", "8"]
        attention = ["--batch_size", "128", "--heads", "12", "--dtype", "bf16", "--repeats", "20", "--warmup", "3", *gpu]
    return [
        Step("gpu_check", 170, [script("gpu_check.py"), "--data", data, "--output", out("gpu_check.json"), *check],
             "gpu_check.json"),
        Step("mim_step_full", 100, [script("bench_mim_step.py"), *mim_step, "--full_step",
                                    "--output", out("mim_step_full.json")], "mim_step_full.json"),
        Step("tokenizers", 50, [script("bench_tokenizers.py"), *tokenizers, "--output", out("tokenizers.json")],
             "tokenizers.json"),
        Step("kmeans", 50, [script("bench_kmeans.py"), *kmeans, "--num_patches", patches, "--repeats", "2",
                            "--precisions", "float32", "bfloat16", "--no_sklearn", "--output", out("kmeans.json")],
             "kmeans.json"),
        Step("kmeans_ccvit", 70, [script("bench_kmeans.py"), *kmeans, "--num_patches", ccvit_patches, "--repeats", "1",
                                  "--precisions", "bfloat16", "--no_faiss", "--no_sklearn",
                                  "--output", out("kmeans_ccvit.json")], "kmeans_ccvit.json"),
        Step("attention", 60, [script("bench_attention.py"), *attention, "--output", out("attention.json")],
             "attention.json"),
        Step("mim_step", 60, [script("bench_mim_step.py"), *mim_step, "--output", out("mim_step.json")],
             "mim_step.json"),
    ]  # fmt: skip


def prepare(kit: str, photos: str) -> None:
    """Fill `kit` with the wheels the GPU machine lacks (the versions installed here) and a copy of `photos`."""
    wheels = os.path.join(kit, "wheels")
    os.makedirs(wheels, exist_ok=True)
    platforms = [flag for name in MANYLINUX for flag in ("--platform", name)]
    for name in MISSING_ON_DEVICE:
        requirement = f"{name}=={metadata.version(name)}"
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version",
             DEVICE_PYTHON, "--implementation", "cp", *platforms, "-d", wheels, requirement],
            check=True,
        )  # fmt: skip
    shutil.copy(photos, os.path.join(kit, "photos" + _archive_suffix(photos)))
    print(f"{kit}: {sorted(os.listdir(wheels))} and the photos; carry it in the device call")


def _archive_suffix(path: str) -> str:
    return next((suffix for suffix in (".tar.gz", ".tgz", ".tar") if path.endswith(suffix)), "")


def _environment(kit: str) -> tuple[dict, str]:
    """The steps' environment: `src` first on PYTHONPATH, then the kit's wheels installed into a folder of their own;
    and what installing them printed (a failed install is logged, and the steps run and report what they lack)."""
    paths, installed = [os.path.join(REPO, "src")], ""
    wheels = os.path.join(kit, "wheels")
    if os.path.isdir(wheels) and os.listdir(wheels):
        site = os.path.join(tempfile.gettempdir(), "hf_mim_gpu_site")
        done = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
             "--no-cache-dir", "--upgrade", "--target", site,
             *sorted(os.path.join(wheels, name) for name in os.listdir(wheels))],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
        )  # fmt: skip
        installed = f"## wheels: {'installed' if done.returncode == 0 else f'exit {done.returncode}'}\n{done.stdout}\n"
        paths.append(site)
    environment = dict(os.environ, PYTHONUNBUFFERED="1")
    environment["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [os.environ.get("PYTHONPATH")])])
    return environment, installed


def _versions(environment: dict) -> str:
    """What the steps run with (a wheel the machine cannot import shows here first)."""
    names = ("torch", "transformers", "accelerate", "datasets", "evaluate", "pyarrow", "fsspec", "huggingface_hub")
    probe = (
        "import importlib, torch\n"
        f"for name in {names!r}:\n"
        "    try:\n        print(name, importlib.import_module(name).__version__)\n"
        "    except Exception as error:\n        print(name, 'fails to import:', error)\n"
        "print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace")  # fmt: skip
    return f"## versions\n{done.stdout}\n"


def _photo_folder(kit: str, photos: str | None) -> str:
    """A folder of the photos: `photos` itself, or the kit's (or `photos`') archive extracted, descending into its
    single top folder."""
    if photos is None and os.path.isdir(kit):
        photos = next((os.path.join(kit, name) for name in sorted(os.listdir(kit)) if name.startswith("photos")), None)
    if photos is None:
        raise SystemExit(f"no photos: pass --photos <folder or tar>, or run `prepare` to put them in {kit}")
    if os.path.isdir(photos):
        return photos
    folder = tempfile.mkdtemp(prefix="hf_mim_gpu_photos_")
    with tarfile.open(photos) as archive:
        archive.extractall(folder, filter="data")
    entries = os.listdir(folder)
    return os.path.join(folder, entries[0]) if len(entries) == 1 else folder


def run(
    kit: str, output: str, budget: float, photos: str | None = None, dry_run: bool = False, only: list[str] | None = None
) -> list[dict]:
    """Run `plan`'s steps (those named in `only`, if given) within `budget` seconds; returns one record per step (also
    written to session.log)."""
    start = time.monotonic()
    steps = plan(_photo_folder(kit, photos) if only is None or "gpu_check" in only else "", output, dry_run)
    unknown = set(only or ()) - {step.name for step in steps}
    if unknown:
        raise SystemExit(f"--steps {' '.join(sorted(unknown))}: no such step; the steps are {[s.name for s in steps]}")
    steps = [step for step in steps if only is None or step.name in only]
    os.makedirs(output, exist_ok=True)
    environment, installed = _environment(kit)
    records = []
    with open(os.path.join(output, "session.log"), "w") as log:
        log.write(installed + _versions(environment))
        for step in steps:
            left = budget - (time.monotonic() - start)
            limit = min(step.seconds, left)
            record = {"step": step.name, "command": " ".join(["python", *step.argv])}
            if limit < min(MINIMUM_STEP_SECONDS, step.seconds):
                record.update(status="skipped: the budget is spent", seconds=0.0)
            else:
                began = time.monotonic()
                try:
                    done = subprocess.run([sys.executable, *step.argv], env=environment, cwd=REPO, timeout=limit,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                          errors="replace")  # fmt: skip
                    status, text = ("ok" if done.returncode == 0 else f"exit {done.returncode}"), done.stdout
                except subprocess.TimeoutExpired as expired:
                    status = f"stopped after {limit:.0f} s"
                    # Cut off mid-output, possibly inside a character of a progress bar.
                    output = expired.stdout or b""
                    text = output.decode(errors="replace") if isinstance(output, bytes) else output
                record.update(status=status, seconds=round(time.monotonic() - began, 1))
                log.write(f"## {step.name}: {record['status']} in {record['seconds']} s\n$ {record['command']}\n{text}\n")
                log.flush()
            records.append(record)
            print(f"{step.name:>14}: {record['status']} ({record['seconds']} s)", flush=True)
        log.write("\n".join(f"{r['step']}: {r['status']} ({r['seconds']} s)" for r in records) + "\n")
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["prepare", "run"])
    parser.add_argument("--kit", default=os.path.join(REPO, ".gpu_kit"), help="The folder carried to the GPU machine")
    parser.add_argument("--photos", default=None, help="prepare: a tar of photos; run: a folder or tar (default: the kit's)")
    parser.add_argument("--output", default=os.environ.get("OUT"), help="run: where the results go (default: $OUT)")
    parser.add_argument("--budget", type=float, default=550.0, help="run: seconds for all the steps together")
    parser.add_argument("--dry_run", action="store_true", help="run: every step small, on the CPU")
    parser.add_argument("--steps", nargs="+", default=None, help="run: only these steps (default: all, in plan order)")
    args = parser.parse_args(argv)
    if args.action == "prepare":
        if args.photos is None:
            parser.error("prepare needs --photos <tar of photos>")
        prepare(args.kit, args.photos)
        return 0
    if args.output is None:
        parser.error("run needs --output (or $OUT)")
    records = run(args.kit, args.output, args.budget, args.photos, args.dry_run, args.steps)
    return 0 if all(record["status"] == "ok" for record in records) else 1


if __name__ == "__main__":
    sys.exit(main())
