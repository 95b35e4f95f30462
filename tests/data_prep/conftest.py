"""Shared fixtures: a tiny random target config and a small prompt file with every shape."""

from __future__ import annotations

import json
import threading

import pytest

from data_prep.schema import DataPrepConfig, GenerationConfig
from data_prep.sources import PromptsConfig, PromptSource
from dspark_model.config import TargetSpec

TINY = dict(family="llama", num_hidden_layers=4, seed=0)
PROMPT_ROWS = [
    {"turns": ["What is two plus two?"]},
    {"turns": ["Name a colour.", "Now another one."]},
    {"prompt": "Say hello."},
    {"messages": [{"role": "system", "content": "Be short."}, {"role": "user", "content": "Why?"},
                  {"role": "assistant", "content": "dropped"}, {"role": "user", "content": "Really?"}]},
    {"turns": ["A slightly longer question about the weather tomorrow, please?"]},
]


def tiny_spec() -> TargetSpec:
    return TargetSpec(id="tiny-random-llama", path=None, dtype="float32", random=dict(TINY))


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PROMPT_ROWS))
    return str(path)


def make_cfg(prompt_file: str, out_dir, **gen) -> DataPrepConfig:
    gen = {"max_new_tokens": 6, "batch_size": 2, **gen}
    return DataPrepConfig(target=tiny_spec(), device="cpu", out_dir=str(out_dir),
                          prompts=PromptsConfig(name="t", sources=[PromptSource(name="p", path=prompt_file)]),
                          generation=GenerationConfig(**gen))


class LoopbackServer:
    """An HTTP server on 127.0.0.1 (ephemeral port), served on a daemon thread while used as a context manager."""

    def _serve(self, handler) -> int:
        from http.server import ThreadingHTTPServer

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        return self.httpd.server_address[1]

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
