"""Credentials in ``generation.base_url`` reach the server and nothing else: no log line, no stream, no file.

A server on 127.0.0.1 demands HTTP basic auth and an ``api_key`` query parameter; data_prep's real CLI talks
to it, then a model card is rendered from the manifest. The secret strings must appear in none of the
outputs, while the server must still have received them.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from data_prep.errors import GenerationError
from data_prep.generate import ChatClient

from .conftest import LoopbackServer

ROOT = Path(__file__).resolve().parents[2]
USER, PASSWORD, API_KEY = "alice", "Pw-s3cret-7731", "KEY-xyz-993311"


class AuthServer(LoopbackServer):
    """Chat completions behind basic auth + ``?api_key=``; ``echo_error`` answers 400 quoting the request."""

    def __init__(self, echo_error: bool = False):
        self.seen: list[tuple[str, str]] = []  # (authorization header, api_key)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                parts = urlsplit(self.path)
                key = parse_qs(parts.query).get("api_key", [""])[0]
                server.seen.append((self.headers.get("Authorization", ""), key))
                want = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
                if echo_error or parts.path != "/v1/chat/completions":
                    status, data = 400, f"bad request {self.path} from {USER}:{PASSWORD}".encode()
                elif self.headers.get("Authorization") != want or key != API_KEY:
                    status, data = 401, b"unauthorized"
                else:
                    status, data = 200, json.dumps({"choices": [{"message": {"content": "four"},
                                                                 "finish_reason": "stop"}],
                                                    "usage": {"completion_tokens": 1}}).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        port = self._serve(Handler)
        self.url = f"http://{USER}:{PASSWORD}@127.0.0.1:{port}/v1?api_key={API_KEY}"



def _leaks(text: str) -> list[str]:
    return [s for s in (PASSWORD, API_KEY, f"{USER}:") if s in text]


def test_data_prep_cli_and_card_never_show_the_credentials(prompt_file, tmp_path, tiny_target):
    out = tmp_path / "data"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    with AuthServer() as server:
        proc = subprocess.run(
            [sys.executable, "-m", "data_prep", "target=tiny", f"out_dir={out}", "generation.backend=openai",
             f"generation.base_url='{server.url}'", "generation.model=fake", "generation.max_new_tokens=4",
             "generation.concurrency=1", f"prompts.sources=[{{name: p, path: '{prompt_file}'}}]"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    assert server.seen and all(s == (want, API_KEY) for s in server.seen)  # the server still got them
    assert _leaks(proc.stdout + proc.stderr) == []
    assert "api_key=REDACTED" in proc.stdout + proc.stderr  # the URL was logged, redacted
    for f in out.rglob("*"):
        if f.is_file():
            assert _leaks(f.read_bytes().decode("latin-1")) == [], f
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["generation"]["base_url"].endswith("/v1?api_key=REDACTED")

    # a manifest written before redaction existed still gives a clean card
    from dspark_model.card import CardSources
    from dspark_model.checkpoint import save_pretrained
    from dspark_model.draft import build_draft_for
    from dspark_model.export import export_draft
    from tests.conftest import tiny_draft_config, tiny_spec

    manifest["generation"]["base_url"] = server.url
    ckpt = save_pretrained(build_draft_for(tiny_target, tiny_draft_config()), tmp_path / "ckpt", tiny_spec())
    export = export_draft(ckpt, tmp_path / "export", "native", target=tiny_target,
                          card_sources=CardSources(data_manifest=manifest))
    card = (export / "README.md").read_text()
    assert "api_key=REDACTED" in card and _leaks(card) == []


@pytest.mark.parametrize("echo_error", [True, False])
def test_client_errors_do_not_quote_the_credentials(echo_error):
    with AuthServer(echo_error=echo_error) as server:
        url = server.url if echo_error else server.url.replace("/v1?", "/v2?")  # 400 either way
        client = ChatClient(url, "m", max_retries=0, sleep=lambda s: None)
        try:
            with pytest.raises(GenerationError, match="HTTP 400") as err:
                client.complete([{"role": "user", "content": "hi"}], 4, 0.0, 1.0, 0)
        finally:
            client.close()
    assert _leaks(str(err.value)) == [] and "127.0.0.1" in str(err.value)
    assert _leaks(client.url) == []
