"""Hub upload with huggingface_hub intercepted: right files and card, one commit, no token leaks, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import httpx2
import pytest
import torch
from huggingface_hub.errors import HfHubHTTPError

from dspark_model import hub
from dspark_model.checkpoint import save_pretrained
from dspark_model.draft import build_draft_for
from dspark_model.export import export_draft
from tests.calibrated import calibrate_checkpoint
from tests.conftest import tiny_draft_config, tiny_spec

SENTINEL = "hf_SENTINELtoken0123456789"


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, tiny_target):
    root = tmp_path_factory.mktemp("hub")
    torch.manual_seed(0)
    draft = build_draft_for(tiny_target, tiny_draft_config())
    ckpt = save_pretrained(draft, root / "ckpt", target_spec=tiny_spec("llama"))
    calibrate_checkpoint(ckpt, root / "calibration")
    return export_draft(ckpt, root / "export", "speculators", target=tiny_target)


class FakeHfApi:
    """Records every call; ``fail[method] = exc`` makes that method raise."""

    calls: list = []
    fail: dict = {}
    uploaded: dict = {}

    def __init__(self, token=None, **kwargs):
        FakeHfApi.calls.append(("init", {"token_given": token is not None}))

    def _maybe_fail(self, name):
        if name in FakeHfApi.fail:
            raise FakeHfApi.fail[name]

    def create_repo(self, repo_id, **kwargs):
        FakeHfApi.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        self._maybe_fail("create_repo")
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, **kwargs):
        FakeHfApi.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))
        self._maybe_fail("create_branch")

    def upload_folder(self, **kwargs):
        FakeHfApi.calls.append(("upload_folder", kwargs))
        self._maybe_fail("upload_folder")
        folder = Path(kwargs["folder_path"])
        FakeHfApi.uploaded = _files(folder)

        class Info:
            commit_url = f"https://huggingface.co/{kwargs['repo_id']}/commit/abc"

        return Info()


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture()
def fake_api(monkeypatch):
    FakeHfApi.calls, FakeHfApi.fail, FakeHfApi.uploaded = [], {}, {}
    monkeypatch.setattr(hub, "HfApi", FakeHfApi)
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    return FakeHfApi


def _no_token_anywhere(root: Path, captured) -> None:
    assert SENTINEL not in captured.out and SENTINEL not in captured.err
    for p in root.rglob("*"):
        if p.is_file():
            assert SENTINEL.encode() not in p.read_bytes(), p


def test_push_sends_export_and_card_in_one_commit(export_dir, fake_api, capsys):
    before = _files(export_dir)
    plan = hub.push(export_dir, "me/tiny-draft", private=True, revision="v1", message="first draft")
    names = [c[0] for c in fake_api.calls]
    assert names == ["init", "create_repo", "create_branch", "upload_folder"]
    create = fake_api.calls[1][1]
    assert create["private"] is True and create["exist_ok"] is True and create["repo_id"] == "me/tiny-draft"
    assert fake_api.calls[2][1]["branch"] == "v1"
    up = fake_api.calls[3][1]
    assert (up["revision"], up["commit_message"], up["repo_id"]) == ("v1", "first draft", "me/tiny-draft")
    serving = {f"serving/{name}" for name in ("manifest.json", "sglang_sts.json", "trtllm_sts.json",
                                              "sglang_sps.json", "trtllm_cost_table.json")}  # sub-folder too
    assert set(fake_api.uploaded) == set(before) == {"README.md", "config.json", "calibration.json",
                                                     "model.safetensors", *serving}
    assert fake_api.uploaded["model.safetensors"] == before["model.safetensors"]
    card = fake_api.uploaded["README.md"].decode()
    assert "vllm serve me/tiny-draft" in card and "<this-repo-id>" not in card
    assert "base_model: tiny-llama" in card
    assert _files(export_dir) == before  # export untouched
    assert not [p for p in export_dir.parent.iterdir() if ".upload-" in p.name]  # staging removed
    assert plan["commit_url"].endswith("/commit/abc")
    _no_token_anywhere(export_dir.parent, capsys.readouterr())


def test_main_branch_needs_no_branch_creation(export_dir, fake_api):
    hub.push(export_dir, "me/tiny-draft")
    assert [c[0] for c in fake_api.calls] == ["init", "create_repo", "upload_folder"]
    assert fake_api.calls[1][1]["private"] is False


def test_dry_run_touches_no_api_and_prints_files_and_card(export_dir, monkeypatch, capsys):
    class Boom:
        def __init__(self, *a, **k):
            raise AssertionError("dry run must not build an API client")

    monkeypatch.setattr(hub, "HfApi", Boom)
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    assert hub.main(["push", str(export_dir), "--repo-id", "me/x", "--dry-run", "--private"]) == 0
    out = capsys.readouterr()
    for name in ("model.safetensors", "config.json", "calibration.json", "README.md"):
        assert name in out.out
    assert "dry run" in out.out and "private" in out.out and "token found" in out.out
    assert "base_model: tiny-llama" in out.out and "vllm serve me/x" in out.out
    _no_token_anywhere(export_dir.parent, out)


def test_no_token_is_a_clear_error(export_dir, fake_api, monkeypatch, capsys):
    monkeypatch.setattr(hub, "get_token", lambda: None)
    with pytest.raises(hub.HubError, match="no Hugging Face token.*HF_TOKEN"):
        hub.push(export_dir, "me/x")
    assert fake_api.calls == []
    assert hub.main(["push", str(export_dir), "--repo-id", "me/x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no Hugging Face token")


def _http_error(status: int, text: str = "forbidden") -> HfHubHTTPError:
    request = httpx2.Request("POST", "https://huggingface.co/api/repos/create")
    return HfHubHTTPError(text, response=httpx2.Response(status, request=request))


def test_repo_not_ours_is_a_clear_error(export_dir, fake_api, capsys):
    fake_api.fail["create_repo"] = _http_error(403, f"403 Forbidden (header Authorization: Bearer {SENTINEL})")
    with pytest.raises(hub.HubError) as info:
        hub.push(export_dir, "someone-else/model")
    msg = str(info.value)
    assert "no write access to someone-else/model" in msg and "Nothing was committed" in msg
    assert "someone-else" in msg and SENTINEL not in msg
    assert "upload_folder" not in [c[0] for c in fake_api.calls]


def test_network_down_says_nothing_was_committed(export_dir, fake_api, capsys):
    fake_api.fail["upload_folder"] = httpx2.ConnectError("Name or service not known")
    with pytest.raises(hub.HubError) as info:
        hub.push(export_dir, "me/x", revision="dev")
    msg = str(info.value)
    assert "could not reach the Hugging Face Hub during upload_folder" in msg
    assert "Nothing was committed" in msg and "me/x@dev is unchanged" in msg and "Re-run" in msg
    assert not [p for p in export_dir.parent.iterdir() if ".upload-" in p.name]
    fake_api.fail = {"create_repo": ConnectionError("offline")}
    with pytest.raises(hub.HubError, match="during create_repo"):
        hub.push(export_dir, "me/x")


def test_invalid_export_is_refused_before_any_call(export_dir, fake_api, tmp_path):
    import shutil

    broken = Path(shutil.copytree(export_dir, tmp_path / "broken"))
    cfg = json.loads((broken / "config.json").read_text())
    cfg["aux_hidden_state_layer_ids"] = [0, 1, 2]
    (broken / "config.json").write_text(json.dumps(cfg))
    assert hub.main(["push", str(broken), "--repo-id", "me/x"]) == 2
    assert fake_api.calls == []
