"""The GPU benchmarks' code paths, run on the CPU (and on the meta device for placement) so that they are ready the day
a GPU is lent: device-aware timing, the full step with each method's tokenizer, id agreement of low precision."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from test_device import on_meta  # noqa: F401 (fixture)
from test_run_mim import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import bench_mim_step  # noqa: E402
import common  # noqa: E402


def test_timing_waits_for_the_device_around_every_call():
    events = []
    runs = {"a": lambda: events.append("a"), "b": lambda: events.append("b")}
    common.time_interleaved(runs, repeats=2, warmup=1, log=lambda _: None, synchronize=lambda: events.append("sync"))
    # Warm-ups, one wait for them, then every timed call between two waits.
    assert events[:3] == ["a", "b", "sync"]
    assert events[3:] == ["sync", "a", "sync", "sync", "b", "sync"] + ["sync", "b", "sync", "sync", "a", "sync"]


def test_the_cpu_needs_no_synchronisation_and_its_peak_is_fp32():
    assert common.device_synchronizer("cpu")() is None
    name, (run, flops) = common.peak_probe("cpu")
    assert name == "fp32 matmul" and flops == 2 * 2048**3


def _args(**overrides):
    defaults = dict(image_size=224, patch_size=16, full_step=True, device="cpu", batch_size=2, seed=0)
    return SimpleNamespace(**{**defaults, **overrides})


@pytest.mark.parametrize("method", sorted(bench_mim_step.PAPER_TOKENIZERS))
def test_full_step_holds_the_paper_tokenizer_and_stays_on_the_device(method, on_meta):
    # Built for the meta device, every weight, buffer and input of the step must be there: a CPU one left behind
    # would fail on a GPU. (test_device.py runs every model and tokenizer on meta; here BEiT's full step runs too.)
    args = _args(device="meta")
    model = bench_mim_step.build_model(method, "tiny", args, seed=0)
    assert type(model.tokenizer).__name__.lower().startswith(bench_mim_step.PAPER_TOKENIZERS[method])
    assert model.config.vocab_size == model.tokenizer.config.codebook_size
    assert {tensor.device.type for tensor in [*model.parameters(), *model.buffers()]} == {"meta"}
    batch = bench_mim_step.make_batch(method, model.config, 2, seed=0, device="meta")
    assert {tensor.device.type for tensor in batch.values()} == {"meta"}
    inputs = bench_mim_step.model_inputs(model, batch)
    assert "labels" not in inputs and "tokenizer_logits" not in inputs
    # CCViT's tokenizer reads the model's own raw view.
    assert ("tokenizer_pixel_values" in inputs) == (method != "ccvit")
    if method == "beit":
        loss = model(**inputs).loss
        assert loss.device.type == "meta"
        loss.backward()


def test_full_step_grid_mismatch_is_one_line_naming_the_flags():
    with pytest.raises(SystemExit, match="--image_size / --patch_size"):
        bench_mim_step.method_config("beit", "tiny", _args(image_size=128))


@pytest.mark.slow
def test_full_step_benchmark_runs_and_its_eager_reference_agrees_with_beit(tmp_path):
    output = tmp_path / "step.json"
    completed = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_mim_step.py"), "--full_step", "--sizes", "tiny",
         "--methods", "beit", "--batch_size", "1", "--repeats", "1", "--warmup", "0", "--dtypes", "fp32",
         "--no_memory", "--output", str(output)],
        capture_output=True, text=True, timeout=600, cwd=REPO / "benchmarks",
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    (group,) = json.loads(output.read_text())["sizes"]["tiny"]
    # The reference computes the same dVAE ids and transformers' BEiT the same loss on them.
    assert group["beit_loss_difference"] < 1e-3
    beit, reference = group["models"]["beit"], group["models"]["transformers"]
    assert beit["fp32"]["timing"]["wall"]["per_s"] > 0 and reference["fp32"]["timing"]["wall"]["per_s"] > 0
    # The tokenizer's FLOPs are in both steps.
    assert reference["flops_per_step"] > 0 and beit["flops_per_step"] > 0.5 * reference["flops_per_step"]
    assert group["matmul_peak"]["probe"] == "fp32 matmul"


def test_tokenizer_benchmark_reports_how_many_ids_bf16_keeps(tmp_path):
    output = tmp_path / "tokenizers.json"
    completed = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_tokenizers.py"), "--families", "hf_mim_kmeans",
         "--dtypes", "fp32", "bf16", "--batch_size", "1", "--repeats", "1", "--output", str(output)],
        capture_output=True, text=True, timeout=600, cwd=REPO / "benchmarks",
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    kmeans = json.loads(output.read_text())["tokenizers"]["hf_mim_kmeans"]
    assert 0.5 <= kmeans["bf16"]["id_agreement_with_fp32"] <= 1.0
    assert "id_agreement_with_fp32" not in kmeans["fp32"]


def test_results_run_with_a_step_budget_trains_exactly_that_many_steps(tmp_path):
    # A time budget gives a loaded machine fewer steps; --budget_steps / --tokenizer_steps give every run the same work.
    import tarfile

    import numpy as np
    import run_results
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("test", 4)):
        for label in ("cat", "dog"):
            folder = tmp_path / "cifar10_jpg" / split / label
            folder.mkdir(parents=True)
            for index in range(count):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{index}.jpg")
    archive = tmp_path / "cifar10_jpg.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "cifar10_jpg", arcname="cifar10_jpg")
    result = run_results.main([
        "--data", str(archive), "--methods", "beit", "--train_per_class", "12", "--test_per_class", "4",
        "--budget_steps", "3", "--tokenizer_steps", "2", "--budget_seconds", "0.001", "--tokenizer_seconds", "0.001",
        "--hidden_size", "24", "--num_hidden_layers", "1", "--batch_size", "8", "--output", str(tmp_path / "r.json"),
        "--work_dir", str(tmp_path / "work"),
    ])  # fmt: skip
    beit = next(row for row in result["rows"] if row["encoder"] == "beit")
    assert beit["steps"] == 3
    dvae_state = json.loads((tmp_path / "work" / "tokenizer_dvae" / "trainer_state.json").read_text())
    assert dvae_state["global_step"] == 2
    assert run_results.budget_flags(60.0, None) == ["--max_steps", "100000", "--max_train_seconds", "60.0"]


def test_data_pipeline_benchmark_runs_with_its_training_step(tmp_path, image_folder):
    output = tmp_path / "data.json"
    completed = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_data.py"), "--data", image_folder, "--methods", "ccvit",
         "--num_images", "8", "--batch_size", "2", "--repeats", "1", "--difference_images", "2", "--output",
         str(output)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads(output.read_text())
    ccvit = results["methods"]["ccvit"]
    assert ccvit["data_worker"]["wall"]["per_s"] > 0 and ccvit["steps"]["tiny"]["workers_needed"] >= 1
    # PIL's Lanczos and torch's, timed on the same crops.
    assert results["lanczos_112"]["PIL"]["wall"]["per_s"] > 0 and results["lanczos_112"]["speedup"]["wall"]["median"] > 0


def test_kmeans_benchmark_compares_distance_precisions_without_faiss(tmp_path):
    # The GPU machine has no faiss: the benchmark times hf_mim's precisions against each other then.
    output = tmp_path / "kmeans.json"
    subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_kmeans.py"), "--num_patches", "3000", "--num_clusters",
         "32", "--num_iterations", "3", "--repeats", "1", "--threads", "1", "--precisions", "float32", "bfloat16",
         "--no_faiss", "--no_sklearn", "--output", str(output)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    results = json.loads(output.read_text())
    assert results["reference"] == "hf_mim/float32" and set(results["inertia"]) == {"hf_mim/float32", "hf_mim/bfloat16"}
    assert abs(results["inertia_rel_diff_vs_reference"]["hf_mim/bfloat16"]) < 1e-6
    assert results["time_ratio_vs_reference"]["hf_mim/float32"] == 1.0


def test_gpu_session_runs_its_plan_within_the_budget(tmp_path):
    # The one device call of a session lent a GPU: every step's command must run as planned (here small, on the CPU;
    # the GPU check's dry run is test_gpu_training.py's), each writing its JSON, and the log must say what happened.
    import gpu_session

    names = [step.name for step in gpu_session.plan("photos", str(tmp_path), dry_run=True)]
    assert names[0] == "gpu_check" and len(names) <= 7  # with session.log, within the 8 files a device call returns
    steps = names[1:]
    records = gpu_session.run(str(tmp_path / "no_kit"), str(tmp_path / "out"), budget=600, dry_run=True, only=steps)
    assert [(record["step"], record["status"]) for record in records] == [(name, "ok") for name in steps]
    for step in gpu_session.plan("photos", str(tmp_path / "out"), dry_run=True)[1:]:
        assert json.loads((tmp_path / "out" / step.output).read_text())
    log = (tmp_path / "out" / "session.log").read_text()
    assert all(f"## {name}: ok" in log for name in steps)
    # A spent budget skips what is left instead of running past the device call's limit.
    records = gpu_session.run(str(tmp_path / "no_kit"), str(tmp_path / "late"), budget=10, dry_run=True, only=steps[:1])
    assert records[0]["status"] == "skipped: the budget is spent"
    with pytest.raises(SystemExit, match="--steps nonesuch: no such step"):
        gpu_session.run(str(tmp_path / "no_kit"), str(tmp_path / "x"), budget=10, dry_run=True, only=["nonesuch"])


def test_flex_attention_score_mods_add_beits_relative_position_bias():
    # The GPU variants of bench_attention (FlexAttention has no backward on the CPU): their score_mods must add the
    # bias transformers' BEiT adds, from the dense bias or from the table through the index.
    import bench_attention
    from torch.nn.attention.flex_attention import flex_attention
    from transformers import BeitConfig
    from transformers.models.beit.modeling_beit import BeitRelativePositionBias

    relative = BeitRelativePositionBias(BeitConfig(image_size=32, patch_size=8, num_attention_heads=2))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        relative.relative_position_bias_table.normal_(generator=generator)
    table, index = relative.relative_position_bias_table.detach(), relative.generate_relative_position_index((4, 4))
    expected_bias = relative((4, 4))
    torch.testing.assert_close(bench_attention.dense_bias(table, index), expected_bias)
    query, key, value = (torch.randn(2, 2, 17, 8, generator=generator) for _ in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=expected_bias)
    for name, score_mod in bench_attention.flex_score_mods(table, index).items():
        torch.testing.assert_close(flex_attention(query, key, value, score_mod=score_mod()), expected, msg=name)


def test_gpu_session_goes_on_after_a_step_stopped_inside_a_character(tmp_path, monkeypatch):
    # A progress bar cut off at a step's limit can end inside a UTF-8 character: the session logs it and goes on.
    import gpu_session

    cut = "import sys, time; sys.stdout.buffer.write('progress █'.encode()[:-1]); sys.stdout.flush(); time.sleep(30)"
    steps = [gpu_session.Step("cut", 2, ["-c", cut]), gpu_session.Step("next", 30, ["-c", "print('ran')"])]
    monkeypatch.setattr(gpu_session, "plan", lambda data, output, dry_run: steps)
    monkeypatch.setattr(gpu_session, "MINIMUM_STEP_SECONDS", 1)
    records = gpu_session.run(str(tmp_path / "no_kit"), str(tmp_path / "out"), budget=60, only=["cut", "next"])
    assert [record["status"] for record in records] == ["stopped after 2 s", "ok"]
    assert "progress \ufffd" in (tmp_path / "out" / "session.log").read_text()
