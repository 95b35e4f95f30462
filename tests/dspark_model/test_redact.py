"""redact_url / redact_text: credentials in a URL never reach a log line or a written file."""

from __future__ import annotations

import logging

import pytest

from dspark_model.card import redact
from dspark_model.redact import RedactingFilter, redact_text, redact_url, url_secrets


@pytest.mark.parametrize("url, want", [
    ("http://user:secret@host:8000/v1?api_key=xyz&n=1", "http://host:8000/v1?api_key=REDACTED&n=1"),
    ("https://tok@host/v1", "https://host/v1"),
    ("https://h/x?X-Amz-Signature=abc&X-Amz-Credential=c&part=2", "https://h/x?X-Amz-Signature=REDACTED&"
                                                                   "X-Amz-Credential=REDACTED&part=2"),
    ("https://h/x?token=a&access_token=b&sig=c&password=d&client_secret=e", "https://h/x?token=REDACTED&"
     "access_token=REDACTED&sig=REDACTED&password=REDACTED&client_secret=REDACTED"),
    ("https://h/cb#access_token=abc&state=1", "https://h/cb#access_token=REDACTED&state=1"),
    ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1"),  # nothing secret: unchanged, byte for byte
    ("https://huggingface.co/org/model?", "https://huggingface.co/org/model?"),
    ("not a url", "not a url"),
])
def test_redact_url(url, want):
    assert redact_url(url) == want


def test_secrets_are_scrubbed_from_free_text_and_log_records():
    url = "http://alice:pa%24%24word@host/v1?key=K3yValue"
    assert {"alice", "pa%24%24word", "pa$$word", "K3yValue"} <= set(url_secrets(url))
    text = f"ConnectError: cannot reach {url}; the server said 'bad key K3yValue for alice'"
    clean = redact_text(text, url_secrets(url))
    assert "K3yValue" not in clean and "pa%24" not in clean and "alice" not in clean and "http://host/v1" in clean
    record = logging.LogRecord("httpx", logging.INFO, __file__, 1, "HTTP Request: POST %s %s", (url, '"200 OK"'),
                               None)
    assert RedactingFilter(url_secrets(url)).filter(record)
    assert record.getMessage() == 'HTTP Request: POST http://host/v1?key=REDACTED "200 OK"'


def test_card_redact_covers_urls_under_any_key():
    doc = {"generation": {"base_url": "http://u:pw123@h/v1?api_key=abc"}, "notes": ["see https://x@h/?sig=1"],
           "hf_token": "hf_abc", "pad_token": "<|pad|>"}
    assert redact(doc) == {"generation": {"base_url": "http://h/v1?api_key=REDACTED"},
                           "notes": ["see https://h/?sig=REDACTED"], "hf_token": "<redacted>",
                           "pad_token": "<|pad|>"}
