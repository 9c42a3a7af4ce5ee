"""The `hf-mim` command: its list of commands, each command's --help, `python -m hf_mim`, `python -m <module>`, a
user's mistake through it, and the console script of an installed (not editable) wheel."""

import ast
import dataclasses
import importlib
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from hf_mim import __version__
from hf_mim.cli import COMMANDS, main

REPO = pathlib.Path(__file__).resolve().parents[1]
# Subprocesses import hf_mim (torch, transformers) each time: about 10 s apiece on 2 cores.
SUBPROCESS_TIMEOUT = 300


def test_help_lists_every_command_with_its_description(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: hf-mim <command>")
    for name, command in COMMANDS.items():
        assert f"  {name} " in out and command.description in out
    assert "accelerate launch [<launch args>] -m hf_mim <command>" in out


def test_no_command_lists_them_and_fails(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "convert-vqkd" in capsys.readouterr().err


def test_version(capsys):
    main(["--version"])
    assert capsys.readouterr().out == f"hf_mim {__version__}\n"


@pytest.mark.parametrize("name", list(COMMANDS))
def test_each_command_shows_its_help_under_its_own_name(name, capsys):
    launch_argv = list(sys.argv)
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: hf-mim {name} [-h]") and "--help" in out
    assert sys.argv == launch_argv


@pytest.mark.parametrize(
    "argv, message",
    [
        (["pretrian"], "error: unknown command 'pretrian'; did you mean `hf-mim pretrain`? `hf-mim --help` lists"),
        (["--verbose"], "error: unknown option '--verbose'; `hf-mim --help` lists"),
    ],
)
def test_an_unknown_command_is_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_a_command_flag_error_is_the_commands_own(tmp_path, capsys):
    # An argparse mistake inside a command names the command, not the `hf-mim` executable.
    with pytest.raises(SystemExit) as exit_info:
        main(["convert-ccvit", "--output_dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        "error: hf-mim convert-ccvit: the following arguments are required: --centroids; `hf-mim convert-ccvit --help` "
        "lists the options\n"
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["visualize"], "error: hf-mim visualize: the following arguments are required: --output_dir"),
        (["push", "./ckpt"], "error: hf-mim push: the following arguments are required: --repo_id"),
        (["knn", "--ks", "ten"], "error: hf-mim knn: argument --ks: invalid int value: 'ten'"),
        (["pretrain", "--output_dir", "x", "--bogus_flag", "1"], "error: hf-mim pretrain: unrecognized arguments: --bogus"),
    ],
)
def test_a_flag_argparse_refuses_is_one_line_printed_once_per_launch(argv, message, capsys, monkeypatch):
    """No usage line above it, and the other processes of an `accelerate launch` stay quiet."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1 and err.endswith("--help` lists the options\n"), err
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and capsys.readouterr().err == ""


# The commands that run under several processes (Trainer's data parallelism); every other one runs in one.
DISTRIBUTED_COMMANDS = {"pretrain", "train-tokenizer", "finetune"}


@pytest.mark.parametrize("name", sorted(set(COMMANDS) - DISTRIBUTED_COMMANDS))
def test_a_one_process_command_launched_as_several_is_one_line_printed_once(name, capsys, monkeypatch, tmp_path):
    # Each process did the whole job on cuda:0 and wrote the same files at once.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--no_such_flag"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: `hf-mim {name}` runs in one process, and the launcher started 2: each would do the whole job on the "
        "same GPU and write the same files at once; run it without accelerate launch or torchrun "
        "(CUDA_VISIBLE_DEVICES picks its GPU)\n"
    )
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit):
        main([name, "--no_such_flag"])
    assert capsys.readouterr().err == ""
    # Its help is still shown, and a job that only exports WORLD_SIZE (no launcher's LOCAL_RANK) runs it alone.
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0 and "usage:" in capsys.readouterr().out
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit):
        main([name, "--no_such_flag"])
    err = capsys.readouterr().err
    assert err.startswith(f"error: hf-mim {name}: ") and "runs in one process" not in err, err


def test_exactly_the_commands_without_data_parallelism_refuse_several_processes():
    for name, command in COMMANDS.items():
        module_name, function_name = command.target.split(":")
        guarded = hasattr(getattr(importlib.import_module(module_name), function_name), "__wrapped__")
        assert guarded == (name not in DISTRIBUTED_COMMANDS), name


def test_every_command_module_runs_with_python_m():
    # `python -m hf_mim.training.run_mim` etc.: each module of a command ends by running its main through run_command.
    for command in COMMANDS.values():
        module_name, function_name = command.target.split(":")
        tree = ast.parse(pathlib.Path(importlib.util.find_spec(module_name).origin).read_text())
        guards = [node for node in tree.body if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)]
        if module_name == "hf_mim.convert.cli":  # several commands in one module: run through hf-mim or the scripts
            assert not guards
            continue
        assert len(guards) == 1 and ast.unparse(guards[0].body[-1]) == f"run_command({function_name})", module_name


def run(args, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **kwargs.pop("env", {})}
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=SUBPROCESS_TIMEOUT, **kwargs)


def test_python_m_module_help(tmp_path):
    result = run([sys.executable, "-m", "hf_mim.training.run_mim", "--help"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("usage: run_mim.py [-h]") and "--train_dir" in result.stdout


def test_python_m_hf_mim_user_error_is_one_line(tmp_path):
    missing = tmp_path / "nowhere"
    args = ["pretrain", "--train_dir", str(missing), "--output_dir", str(tmp_path / "out"), "--do_train", "--use_cpu"]
    result = run([sys.executable, "-m", "hf_mim", *args], cwd=tmp_path)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(errors) == 1 and f"--train_dir {missing}: no such folder" in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_console_script_of_an_installed_wheel(tmp_path):
    # Built from a copy, so the build writes nothing into the checkout (build/, egg-info) while others use it.
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(REPO / "src", source / "src", symlinks=True, ignore=ignore)
    shutil.copytree(REPO / "model_cards", source / "model_cards")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    wheel_dir, site = tmp_path / "wheel", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    built = run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheel_dir), str(source)])
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = wheel_dir.glob("hf_mim-*.whl")
    installed = run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)])
    assert installed.returncode == 0, installed.stderr[-3000:]

    # The wheel's hf_mim, not the editable checkout the test environment also has (cwd has no src/ either).
    env = {"PYTHONPATH": str(site)}
    code = "import importlib.util; print(importlib.util.find_spec('hf_mim').origin)"
    origin = run([sys.executable, "-c", code], cwd=tmp_path, env=env).stdout.strip()
    assert pathlib.Path(origin) == site / "hf_mim" / "__init__.py"

    # A real conversion through the console script: dispatch, the converters' module and the model card templates
    # (package data) all come from the wheel.
    np.save(tmp_path / "centroids.npy", np.random.default_rng(0).random((16, 48), dtype=np.float32))
    args = ["convert-ccvit", "--centroids", "centroids.npy", "--output_dir", "kmeans", "--image_size", "16"]
    result = run([str(site / "bin" / "hf-mim"), *args], cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Saved the k-means tokenizer to kmeans" in result.stdout
    assert (tmp_path / "kmeans" / "config.json").exists()
    assert "k-means" in (tmp_path / "kmeans" / "README.md").read_text()


def test_a_command_ends_its_process_group_before_exiting(tmp_path):
    # Left to interpreter shutdown, gloo's threads can abort a finished process ("terminate called without an active
    # exception"), failing the whole launch.
    import torch.distributed as dist

    from hf_mim.cli import run_command

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert run_command(lambda argv: "done", []) == "done"
    assert not dist.is_initialized()


def test_a_json_options_file_parses_as_the_same_flags(tmp_path):
    from hf_mim.training import run_image_classification

    flags = ["--model_name_or_path", "m", "--train_dir", "t", "--output_dir", str(tmp_path / "o"), "--do_train",
             "--use_cpu", "--report_to", "none", "--lr_scheduler_type", "cosine_with_min_lr", "--lr_scheduler_kwargs", '{"min_lr": 1e-06}', "--mixup", "0.8",
             "--dataloader_drop_last", "--skip_nonfinite_steps", "false"]  # fmt: skip
    options = {"model_name_or_path": "m", "train_dir": "t", "output_dir": str(tmp_path / "o"), "do_train": True,
               "use_cpu": True, "report_to": ["none"], "lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr": 1e-6}, "mixup": 0.8,
               "dataloader_drop_last": True, "skip_nonfinite_steps": False, "validation_dir": None}  # fmt: skip
    path = tmp_path / "options.json"
    path.write_text(json.dumps(options))
    from_flags = run_image_classification.parse_args(flags)
    from_file = run_image_classification.parse_args([str(path)])
    assert [dataclasses.asdict(parsed) for parsed in from_file] == [dataclasses.asdict(parsed) for parsed in from_flags]
    assert from_file[-1].lr_scheduler_kwargs == {"min_lr": 1e-6} and from_file[-1].dataloader_drop_last

    # Lists the command line cannot give: several values of an option of one string, and an empty list.
    path.write_text(json.dumps({**options, "optim_target_modules": ["attn", "mlp"], "label_names": []}))
    training_args = run_image_classification.parse_args([str(path)])[-1]
    assert training_args.optim_target_modules == ["attn", "mlp"] and training_args.label_names == []
