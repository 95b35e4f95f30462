"""The openai backend against a tiny OpenAI-compatible server started on 127.0.0.1 by the test."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler

import pytest

from data_prep.errors import GenerationError
from data_prep.generate import ChatClient, derive_seed
from data_prep.pipeline import run
from data_prep.store import load_tokenized
from dspark_model.tiny import build_tiny_tokenizer

from .conftest import LoopbackServer, make_cfg


def reply_for(messages: list[dict]) -> str:
    """The fake model's deterministic answer: depends on the whole conversation so far."""
    users = [m["content"] for m in messages if m["role"] == "user"]
    return f"answer {len(messages)}: {users[-1][::-1][:12]}"


class FakeServer(LoopbackServer):
    """ThreadingHTTPServer on an ephemeral port; optionally fails every distinct request once (HTTP 503)."""

    def __init__(self, fail_first: bool = False, status: int = 200, delay_s: float = 0.02):
        self.requests: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        self.seen: set[str] = set()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(body)
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    key = json.dumps(body, sort_keys=True)
                    fail = fail_first and key not in server.seen
                    server.seen.add(key)
                time.sleep(delay_s)
                with server.lock:
                    server.in_flight -= 1
                if fail or status != 200 or self.path != "/v1/chat/completions":
                    self.send_response(503 if fail else (status if status != 200 else 404))
                    self.end_headers()
                    self.wfile.write(b"nope")
                    return
                content = reply_for(body["messages"])
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content},
                                                "finish_reason": "stop"}],
                                   "usage": {"completion_tokens": len(content)}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.url = f"http://127.0.0.1:{self._serve(Handler)}/v1"



def _openai_cfg(prompt_file, out, url, **kw):
    return make_cfg(prompt_file, out, backend="openai", base_url=url, model="fake", concurrency=2,
                    backoff_s=0.001, max_retries=2, timeout_s=5.0, **kw)


def test_openai_backend_with_retries_concurrency_and_multi_turn(prompt_file, tmp_path):
    with FakeServer(fail_first=True) as server:
        manifest = run(_openai_cfg(prompt_file, tmp_path / "o", server.url))
    assistant_turns = 1 + 2 + 1 + 2 + 1
    assert len(server.requests) == 2 * assistant_turns  # each request failed once, then succeeded
    assert server.max_in_flight <= 2
    # Turn 2 of the two-turn row is conditioned on the generated turn 1.
    second = [r for r in server.requests
              if len(r["messages"]) == 3 and r["messages"][0]["content"] == "Name a colour."]
    first_reply = reply_for([{"role": "user", "content": "Name a colour."}])
    assert second[0]["messages"][1] == {"role": "assistant", "content": first_reply}
    assert second[0]["seed"] == derive_seed(0, "p:2", 1) and second[0]["model"] == "fake"
    ds, _ = load_tokenized(tmp_path / "o")
    tok = build_tiny_tokenizer()
    row = ds[1]
    assert row["row_id"] == "p:2"
    masked = tok.decode([i for i, m in zip(row["input_ids"], row["loss_mask"]) if m])
    assert masked == first_reply + "<|im_end|>" + reply_for(second[0]["messages"]) + "<|im_end|>"
    assert manifest.counts["rows"] == 5


def test_openai_resume_only_requests_missing_rows(prompt_file, tmp_path):
    out = tmp_path / "r"
    with FakeServer() as server:
        first = run(_openai_cfg(prompt_file, out, server.url))
        log = out / "generations.jsonl"
        lines = log.read_text().splitlines()
        log.write_text("\n".join(lines[:2]) + "\n" + lines[2][:10])  # interrupted mid-line
        before = len(server.requests)
        again = run(_openai_cfg(prompt_file, out, server.url))
        missing = [json.loads(x) for x in lines[2:]]
        assert len(server.requests) - before == sum(len(r["turns"]) for r in missing)
    assert again.fingerprint == first.fingerprint


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_unreachable_server_gives_one_clear_error(prompt_file, tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    client = ChatClient(url, "m", timeout_s=2.0, max_retries=2, sleep=lambda s: None)
    with pytest.raises(GenerationError, match=r"after 3 attempts \(ConnectError") as err:
        client.complete([{"role": "user", "content": "hi"}], 4, 0.0, 1.0, 0)
    assert "\n" not in str(err.value) and "start the OpenAI-compatible server" in str(err.value)
    with pytest.raises(GenerationError, match="cannot get a completion"):
        run(_openai_cfg(prompt_file, tmp_path / "u", url))


def test_client_error_is_not_retried():
    with FakeServer(status=400) as server:
        client = ChatClient(server.url, "m", max_retries=3, sleep=lambda s: None)
        with pytest.raises(GenerationError, match="HTTP 400"):
            client.complete([{"role": "user", "content": "hi"}], 4, 0.0, 1.0, 0)
    assert len(server.requests) == 1
