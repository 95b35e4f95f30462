"""Upload an export folder to the Hugging Face Hub in one commit.

    python -m dspark_model.hub push runs/export/<name> --repo-id <user>/<name> [--private] [--revision BRANCH]
                                   [--message "..."] [--dry-run]

What happens: the export is validated against its schema (and a calibration.json must belong to the weights
beside it: ``calibration.py``); the repo is created if absent (``--private`` applies
to a NEW repo, an existing one keeps its visibility); a branch is created for ``--revision`` when needed; the
folder (weights, config.json, calibration.json, README.md card with the repo id filled in) goes up with
``upload_folder``, which uploads every file first and then makes a single commit, so an interrupted push
leaves the repo unchanged. ``--dry-run`` lists the files and prints the card, and touches no network.

The token comes from ``HF_TOKEN`` or ``hf auth login`` (``huggingface_hub.get_token``); it is handed to the
client only, never printed, logged or written.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

from dspark_model import __version__
from dspark_model.calibration import REEXPORT_HINT, CalibrationError, read_beside
from dspark_model.card import REPO_PLACEHOLDER, CardError, context_from_export, render_card
from dspark_model.export_schema import ExportSchemaError, validate_export

log = logging.getLogger(__name__)
README_NAME = "README.md"


class HubError(RuntimeError):
    """A push cannot go ahead or failed; the message says what happened to the repo and what to do."""


def _network_errors() -> tuple[type[BaseException], ...]:
    """Exception types meaning 'the Hub could not be reached' for the installed HTTP stack."""
    kinds: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx", "requests"):
        try:
            mod = __import__(module)
        except ImportError:
            continue
        for name in ("TransportError", "ConnectionError", "Timeout"):
            kind = getattr(mod, name, None)
            if isinstance(kind, type) and issubclass(kind, BaseException):
                kinds.append(kind)
    return tuple(kinds)


def upload_files(export_dir: str | Path) -> list[tuple[str, int]]:
    """(name, bytes) of what a push sends: every visible file (hidden temp files are skipped)."""
    export_dir = Path(export_dir)
    files = [(str(p.relative_to(export_dir)), p.stat().st_size) for p in sorted(export_dir.rglob("*"))
             if p.is_file() and not any(part.startswith(".") for part in p.relative_to(export_dir).parts)]
    names = {n for n, _ in files}
    return files if README_NAME in names else files + [(README_NAME, 0)]


def card_text(export_dir: str | Path, repo_id: str) -> str:
    """The card that will be uploaded: README.md with the repo id filled in, or one rendered now."""
    readme = Path(export_dir) / README_NAME
    text = readme.read_text() if readme.is_file() else render_card(context_from_export(export_dir))
    return text.replace(REPO_PLACEHOLDER, repo_id)


def _stage(export_dir: Path, card: str) -> Path:
    """A sibling folder holding hard links to the export plus the final card (the export is not modified)."""
    try:
        stage = Path(tempfile.mkdtemp(dir=export_dir.parent, prefix=f".{export_dir.name}.upload-"))
    except OSError:
        stage = Path(tempfile.mkdtemp(prefix="dspark-upload-"))
    for name, _ in upload_files(export_dir):
        src, dst = export_dir / name, stage / name
        if name == README_NAME:
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:  # another filesystem, or links not allowed
            shutil.copy2(src, dst)
    (stage / README_NAME).write_text(card)
    return stage


def _explain(exc: BaseException, stage: str, repo_id: str, revision: str | None, token: str) -> HubError:
    """Turn a Hub/network failure into one message that says what state the repo is in."""
    where = f"{repo_id}@{revision or 'main'}"
    namespace = repo_id.split("/")[0] if "/" in repo_id else "your user"
    if isinstance(exc, HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status == 401:
            msg = (f"the Hub rejected the token (401) during {stage}: it is invalid or expired. Run `hf auth "
                   f"login` again or set HF_TOKEN to a valid token with write access. Nothing was committed.")
        elif status == 403 or isinstance(exc, RepositoryNotFoundError):
            msg = (f"no write access to {repo_id} ({status or 404}) during {stage}: the repo exists and is not "
                   f"yours, or namespace '{namespace}' is not one your token may write to, or the token is "
                   f"read-only. Push to a repo you own (--repo-id <your-user>/<name>) or use a write token of a "
                   f"member of '{namespace}'. Nothing was committed.")
        else:
            msg = (f"the Hub refused {stage} for {where} (HTTP {status}): {exc}. Nothing was committed; fix the "
                   f"cause and re-run the same command.")
    else:
        created = "" if stage == "create_repo" else f" (the repo {repo_id} itself may exist now, unchanged)"
        if type(exc).__name__ == "OfflineModeIsEnabled":
            created += "; HF_HUB_OFFLINE is set: unset it to push"
        msg = (f"could not reach the Hugging Face Hub during {stage} ({type(exc).__name__}). Nothing was "
               f"committed: upload_folder makes one atomic commit after all files are uploaded, so {where} is "
               f"unchanged{created}. Re-run the same command when the network is back (files already uploaded "
               f"are skipped).")
    return HubError(msg.replace(token, "<token>") if token else msg)


def push(export_dir: str | Path, repo_id: str, private: bool = False, revision: str | None = None,
         message: str | None = None, dry_run: bool = False, echo=print) -> dict:
    """Upload ``export_dir`` to ``repo_id`` (see the module docstring). Returns what was (or would be) sent."""
    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise HubError(f"{export_dir} is not a folder; export first: python -m dspark_model.export <ckpt> --out DIR")
    if "/" not in repo_id or repo_id.count("/") != 1:
        raise HubError(f"--repo-id {repo_id!r} must look like <user or org>/<name>")
    fmt = validate_export(export_dir)
    try:  # a calibration.json goes up only beside the weights it was fitted on
        read_beside(export_dir, fix=REEXPORT_HINT)
    except CalibrationError as exc:
        raise HubError(f"not publishing {export_dir}: {exc}. Nothing was sent.") from None
    files = upload_files(export_dir)
    card = card_text(export_dir, repo_id)
    kind, layout = ("EAGLE-3", fmt.removesuffix("-eagle3")) if fmt.endswith("-eagle3") else ("DSpark", fmt)
    message = message or f"Upload {kind} draft ({layout} format) with dspark-toolkit {__version__}"
    plan = {"repo_id": repo_id, "revision": revision or "main", "private": private, "format": fmt,
            "message": message, "files": [n for n, _ in files], "dry_run": dry_run, "commit_url": None}
    if dry_run:
        _print_plan(plan, files, card, echo)
        return plan
    token = get_token()
    if not token:
        raise HubError("no Hugging Face token found: set HF_TOKEN or run `hf auth login` (huggingface-cli "
                       "login) with a token that has write access. Nothing was sent.")
    api = HfApi(token=token)
    stage_dir = _stage(export_dir, card)
    stage = "create_repo"
    try:
        api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        if revision and revision != "main":
            stage = "create_branch"
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        stage = "upload_folder"
        info = api.upload_folder(repo_id=repo_id, folder_path=str(stage_dir), repo_type="model",
                                 revision=revision, commit_message=message)
    except (HfHubHTTPError, *_network_errors()) as exc:
        raise _explain(exc, stage, repo_id, revision, token) from None
    finally:
        shutil.rmtree(stage_dir, ignore_errors=True)
    plan["commit_url"] = str(getattr(info, "commit_url", "") or "")
    echo(f"pushed {len(files)} files to {repo_id}@{plan['revision']} {plan['commit_url']}".rstrip())
    return plan


def _print_plan(plan: dict, files: list[tuple[str, int]], card: str, echo) -> None:
    token = "found" if get_token() else "NOT found (a real push would stop: set HF_TOKEN or `hf auth login`)"
    echo(f"dry run: nothing is sent to the Hub. Would push a {plan['format']} export to {plan['repo_id']} "
         f"(revision {plan['revision']}, {'private' if plan['private'] else 'public'} if created), "
         f"commit message {plan['message']!r}; token {token}.")
    for name, size in files:
        echo(f"  {name:<28} {size / 1e6:10.2f} MB" if name != README_NAME else f"  {name:<28}   (card below)")
    echo(f"  total {sum(s for _, s in files) / 1e6:.2f} MB in {len(files)} files")
    echo("---- README.md ----")
    echo(card)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dspark_model.hub", description="Upload an export to the Hub.")
    sub = p.add_subparsers(dest="command", required=True)
    pp = sub.add_parser("push", help="upload an export folder (one commit)")
    pp.add_argument("export_dir", help="folder written by python -m dspark_model.export")
    pp.add_argument("--repo-id", required=True, help="<user or org>/<name>")
    pp.add_argument("--private", action="store_true", help="create the repo private (new repos only)")
    pp.add_argument("--revision", help="branch to push to (created from main if absent)")
    pp.add_argument("--message", help="commit message")
    pp.add_argument("--dry-run", action="store_true", help="list files and print the card; no network")
    return p.parse_args(argv)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        push(args.export_dir, args.repo_id, private=args.private, revision=args.revision,
             message=args.message, dry_run=args.dry_run)
    except (HubError, ExportSchemaError, CardError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


__all__ = ["HubError", "card_text", "push", "upload_files"]

if __name__ == "__main__":
    sys.exit(main())
