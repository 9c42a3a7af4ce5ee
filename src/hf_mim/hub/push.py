"""Uploading an hf_mim checkpoint folder to the Hub so that it loads where hf_mim is not installed.

`prepare_upload_folder` builds exactly what is uploaded: the weights, config, image processors
(the root one and those of subfolders such as a MIM checkpoint's `tokenizer/`), `trainer_state.json`,
results and training arguments, every code file the `auto_map`s need, and a freshly rendered card.
`push_folder` creates the repo (and branch), checks its visibility, and uploads that folder in one commit.
"""

import argparse
import contextlib
import fnmatch
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import HfApi, constants
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import HFValidationError, validate_repo_id

from ..arguments import OneLineErrorParser
from ..checkpoint_folder import (
    PROCESSOR_CONFIG,
    TOKENIZER_SUBFOLDER,
    complete_code_files,
    has_tokenizer_image_processor,
    unreadable_weights,
)
from ..cli import one_process
from ..errors import UsageError, first_line
from ..training.loading import looks_local
from .cards import DEFAULT_LICENSE, load_results, read_training_args, write_model_card

logger = logging.getLogger(__name__)

# Files of a checkpoint folder that belong on the Hub; optimizer states, RNG states and `checkpoint-*`
# folders stay local.
UPLOAD_PATTERNS = (
    "README.md",
    "config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "*.py",
    PROCESSOR_CONFIG,
    "trainer_state.json",
    "training_args.bin",
    "*results.json",
)


def _check_checkpoint(folder: Path) -> None:
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder}: {'a file, not a folder' if folder.exists() else 'no such folder'}; pass an hf_mim checkpoint folder (the output_dir of `hf-mim pretrain` or "
            "`hf-mim train-tokenizer`, or a converted model)"
        )
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json; is it an hf_mim checkpoint folder (save_pretrained)?")
    try:
        model_type = json.loads(config_path.read_text()).get("model_type", "")
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path} is not valid JSON ({error}); save the model again with save_pretrained") from error
    if not model_type.startswith("hf_mim_"):
        raise ValueError(
            f"{folder} holds a {model_type or 'model without model_type'!r} checkpoint, not an hf_mim one "
            "(model_type hf_mim_*); push other models, such as the stock transformers classifiers of `hf-mim "
            "finetune`, with their own push_to_hub or `hf upload`"
        )
    if not any(folder.glob("*.safetensors")):
        raise FileNotFoundError(f"{folder} has no *.safetensors weights; save the model with save_pretrained first")
    unreadable = unreadable_weights(folder)
    if unreadable is not None:
        raise ValueError(
            f"{unreadable[0]} is unreadable ({unreadable[1]}), a truncated or corrupt copy: copy or save the model again"
        )
    if not (folder / PROCESSOR_CONFIG).is_file():
        raise FileNotFoundError(
            f"{folder} has no {PROCESSOR_CONFIG}: without its image processor the model cannot be used from the Hub. "
            "Save it there, e.g. AutoImageProcessor.from_pretrained(<source>).save_pretrained(folder)"
        )
    if json.loads(config_path.read_text()).get("tokenizer_config") and not has_tokenizer_image_processor(folder):
        # The card and README tell users to load the view with subfolder="tokenizer".
        raise FileNotFoundError(
            f"{folder} is a MIM checkpoint without its tokenizer view ({TOKENIZER_SUBFOLDER}/{PROCESSOR_CONFIG}; an "
            "older hf_mim's checkpoint-<step>?), which its Hub copy would load with subfolder='tokenizer': push the "
            "run's --output_dir, or save the tokenizer's image processor there with save_pretrained"
        )


def _check_upload_dir(folder: Path, upload_dir: Path, name: str) -> None:
    """Refuse an upload folder (called `name` in the messages) that holds files or is the checkpoint itself."""
    if upload_dir.exists() and (not upload_dir.is_dir() or any(upload_dir.iterdir())):
        raise FileExistsError(f"{name} is not empty; pass a new or empty folder for the upload")
    if upload_dir.resolve() == folder.resolve():
        raise ValueError(f"{name} is the checkpoint folder; pass another, new or empty, folder for the upload")
    if folder.resolve() in upload_dir.resolve().parents:
        # Every later push of the checkpoint would upload this copy (weights included) as a subfolder.
        raise ValueError(f"{name} is inside the checkpoint folder {folder}; pass a folder outside it for the upload")


def _copy_matching(source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.iterdir()):
        if path.is_file() and any(fnmatch.fnmatch(path.name, pattern) for pattern in UPLOAD_PATTERNS):
            shutil.copyfile(path, target / path.name)


def prepare_upload_folder(folder, upload_dir, *, repo_id: str | None = None, **card_options) -> list[str]:
    """Write into `upload_dir` (new or empty) exactly what pushing `folder` uploads; returns its relative paths.

    Keyword arguments other than `repo_id` go to `hf_mim.hub.write_model_card` (`datasets`, `license`,
    `base_model`, `results`, `tags`, `model_name`).
    """
    folder, upload_dir = Path(folder), Path(upload_dir)
    _check_checkpoint(folder)
    _check_upload_dir(folder, upload_dir, str(upload_dir))
    _copy_matching(folder, upload_dir)
    for processor_config in sorted(folder.glob(f"*/{PROCESSOR_CONFIG}")):
        _copy_matching(processor_config.parent, upload_dir / processor_config.parent.name)
    complete_code_files(upload_dir)
    training_args = None
    if (upload_dir / "training_args.bin").is_file():
        training_args = read_training_args(upload_dir / "training_args.bin")
        if training_args and training_args.get("hub_token"):
            # Trainer pickles the arguments as given, so a `--hub_token` would be published with them.
            (upload_dir / "training_args.bin").unlink()
            logger.warning("Not uploading training_args.bin: it holds the Hub token the run was given (--hub_token)")
    write_model_card(upload_dir, repo_id=repo_id, training_args=training_args, **card_options)
    return sorted(str(path.relative_to(upload_dir)) for path in upload_dir.rglob("*") if path.is_file())


def default_repo_id(training_args) -> str:
    """The repo a training run pushes to: `--hub_model_id`, else its `--output_dir`'s name (Trainer's rule)."""
    return training_args.hub_model_id or Path(training_args.output_dir).absolute().name


def _unreachable(error: Exception) -> bool:
    # huggingface_hub's HTTP client (httpx, or httpx2 in newer releases) raises ConnectError or ConnectTimeout when
    # no connection opens, offline mode is a ConnectionError; a timeout mid-upload is not the user's to fix and keeps
    # its traceback.
    names = {"ConnectError", "ConnectTimeout"}
    return isinstance(error, ConnectionError) or any(cls.__name__ in names for cls in type(error).__mro__)


@contextlib.contextmanager
def hub_request_errors(repo_id: str, token_flag: str = "--token"):
    """The Hub refusing the token (401) or the repo (403), or not answering, as a one-line `UsageError` naming the
    fix; `token_flag` is the command's token flag. Other errors (a server failure) keep their tracebacks."""
    try:
        yield
    except HfHubHTTPError as error:
        status = getattr(error.response, "status_code", None)
        if status == 401:
            raise UsageError(
                f"the Hub refused the token for {repo_id} (401 Unauthorized): log in with `hf auth login`, set "
                f"HF_TOKEN or pass {token_flag} with a write token"
            ) from error
        if status == 403:
            raise UsageError(
                f"the token may not write to {repo_id} (403 Forbidden): pass {token_flag} with write access to its "
                "namespace, or a repo id in your own namespace"
            ) from error
        raise
    except Exception as error:
        if not _unreachable(error):
            raise
        raise UsageError(
            f"cannot reach the Hub at {constants.ENDPOINT} to push {repo_id} ({first_line(error)}); check the "
            "network connection (and that HF_HUB_OFFLINE is unset), or push the folder later with hf-mim push"
        ) from error


def prepare_repo(
    api: HfApi,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    token=None,
    private_flag: str = "--private",
) -> str:
    """Create the repo (if needed) and the branch `revision` (if needed); returns the full repo id.

    The Hub refuses commits to a branch that does not exist, and `create_repo` ignores `private` for a
    repo that exists: a public repo asked to be private is an error (naming `private_flag`, the command's flag)
    rather than a silent public upload.
    """
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True, token=token).repo_id
    if private and not api.repo_info(repo_id, token=token).private:
        raise UsageError(
            f"{repo_id} already exists and is public, but a private push was asked for; make it private first "
            f"(HfApi().update_repo_settings({repo_id!r}, private=True)) or push without {private_flag}"
        )
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True, token=token)
    return repo_id


def default_commit_message(folder) -> str:
    return f"Upload {Path(folder).resolve().name} with hf_mim"


def describe_push(repo_id: str, *, private: bool, revision: str | None, commit_message: str) -> str:
    """Where and how a push commits, as a dry run reports it."""
    branch = f"branch {revision} (created from main if missing)" if revision else "main"
    visibility = "a private repo (an existing public one is an error)" if private else "the repo (public if created)"
    return f"one commit {commit_message!r} to {branch} of {repo_id}, {visibility}"


def push_folder(
    folder,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    private_flag: str = "--private",
    **card_options,
):
    """Upload the hf_mim checkpoint in `folder` to `repo_id` (on branch `revision`) in one commit.

    Returns the `CommitInfo`. Card options as for `prepare_upload_folder`; the card pushed is also written to
    `folder/README.md`. `private_flag` names the command's flag of `private` in the error of a public repo.
    """
    api = HfApi(token=token)
    repo_id = prepare_repo(api, repo_id, private=private, revision=revision, private_flag=private_flag)
    with tempfile.TemporaryDirectory() as upload_dir:
        files = prepare_upload_folder(folder, upload_dir, repo_id=repo_id, **card_options)
        logger.info("Uploading %d files to %s%s", len(files), repo_id, f"@{revision}" if revision else "")
        commit = api.upload_folder(
            folder_path=upload_dir,
            repo_id=repo_id,
            revision=revision,
            commit_message=commit_message or default_commit_message(folder),
        )
        # The folder keeps the card it was pushed with, so the next push starts from its datasets and results.
        try:
            shutil.copyfile(Path(upload_dir) / "README.md", Path(folder) / "README.md")
        except OSError as error:
            logger.warning("Could not update %s/README.md with the pushed card: %s", folder, error)
    return commit


def _require_hub_id(flag: str, value: str) -> None:
    """A one-line error for a card's `--flag` that is not a Hub id (the Hub refuses the card's metadata only once the
    upload reaches it) or that names a local folder (a card links ids, not paths)."""
    # "cifar10" is a Hub id even where a folder of that name lies here; "runs/dvae" is one only if no such folder does.
    if looks_local(value) or ("/" in value and os.path.exists(value)):
        raise UsageError(f"--{flag} {value} is a local path; the card links Hub repos: pass its Hub id (namespace/name)")
    try:
        validate_repo_id(value)
    except HFValidationError as error:
        raise UsageError(f"--{flag} {value!r} is not a Hub id (namespace/name); pass the id of the repo on the Hub") from error


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = OneLineErrorParser(
        description="Upload an hf_mim checkpoint folder (weights, config, code, image processors, model card) to the Hub.",
    )
    parser.add_argument("folder", help="The checkpoint folder (a run_mim.py / train_tokenizer.py output_dir, a converted model)")
    parser.add_argument("--repo_id", required=True, help="namespace/name of the Hub repo (created if missing)")
    parser.add_argument("--private", action="store_true", help="Create the repo private (an existing public repo is an error)")
    parser.add_argument("--revision", default=None, help="Branch to commit to (created from main if missing)")
    parser.add_argument("--commit_message", default=None)
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the stored login)")
    parser.add_argument("--dataset", action="append", default=None, help="Hub id of a training dataset (repeatable)")
    parser.add_argument("--license", default=None, help=f"Licence id for the card (default: the folder's card, else {DEFAULT_LICENSE})")
    parser.add_argument("--base_model", default=None, help="Hub id of the model this one was fine-tuned from")
    parser.add_argument(
        "--results",
        default=None,
        help='A JSON file of evaluation results: a list such as [{"protocol": "knn", "dataset": "imagenet-1k", '
        '"value": 0.41}]',
    )
    parser.add_argument("--tag", action="append", default=None, help="Extra Hub tag (repeatable)")
    parser.add_argument(
        "--dry_run",
        nargs="?",
        const="",
        default=None,
        metavar="UPLOAD_DIR",
        help="Write the exact upload folder to UPLOAD_DIR (default ./<name>-upload) instead of pushing",
    )
    return parser.parse_args(argv)


@one_process("push")
def main(argv: Sequence[str] | None = None):
    args = parse_args(argv)
    folder = Path(args.folder)
    # Before any Hub request: both library checks name the folder and the fix, as a user's mistake needs.
    try:
        validate_repo_id(args.repo_id)
    except HFValidationError as error:
        raise UsageError(
            f"--repo_id {args.repo_id!r} is not a Hub repo id (namespace/name, or name in your own namespace: letters, "
            "digits, '-', '_' and '.', at most 96 characters); pass e.g. --repo_id your-name/beit-base"
        ) from error
    for flag, values in (("dataset", args.dataset or []), ("base_model", [args.base_model] if args.base_model else [])):
        for value in values:
            _require_hub_id(flag, value)
    try:
        _check_checkpoint(folder)
        if args.dry_run is not None:
            upload_dir = Path(args.dry_run or f"{args.repo_id.split('/')[-1]}-upload")
            _check_upload_dir(folder, upload_dir, f"--dry_run {upload_dir}")
    except (OSError, ValueError) as error:
        raise UsageError(str(error)) from error
    logging.basicConfig(format="%(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    card_options = {
        "datasets": args.dataset,
        "license": args.license,
        "base_model": args.base_model,
        "results": load_results(args.results) if args.results else None,
        "tags": args.tag,
    }
    if args.dry_run is not None:
        files = prepare_upload_folder(args.folder, upload_dir, repo_id=args.repo_id, **card_options)
        push = describe_push(
            args.repo_id,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message or default_commit_message(args.folder),
        )
        print(f"Dry run, nothing uploaded: wrote the {len(files)} files into {upload_dir} that the push would upload in "
              f"{push}:")  # fmt: skip
        print("\n".join(f"  {name}" for name in files))
        return upload_dir
    with hub_request_errors(args.repo_id):
        commit = push_folder(
            args.folder,
            args.repo_id,
            private=args.private or None,
            revision=args.revision,
            commit_message=args.commit_message,
            token=args.token,
            **card_options,
        )
    print(f"Pushed {args.folder} to {commit.repo_url.repo_id}{'@' + args.revision if args.revision else ''}: {commit.commit_url}")
    return commit


__all__ = [
    "UPLOAD_PATTERNS",
    "default_commit_message",
    "default_repo_id",
    "describe_push",
    "hub_request_errors",
    "main",
    "prepare_repo",
    "prepare_upload_folder",
    "push_folder",
]


if __name__ == "__main__":
    from ..cli import run_command

    run_command(main)
