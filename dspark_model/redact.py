"""Credentials never leave the process: URLs are redacted before they are logged or written.

A server address such as ``generation.base_url`` may carry credentials in two places: the userinfo part
(``http://user:password@host``) and the query (``?api_key=...``, pre-signed ``?signature=...``). Every
place that logs a URL or writes it to a file (manifest, model card, error messages) passes it through
``redact_url`` first; the request itself still uses the full URL.

    redact_url("http://bob:pw@host:8000/v1?api_key=xyz&n=1")  ->  "http://host:8000/v1?api_key=REDACTED&n=1"
"""

from __future__ import annotations

import logging
import re
from urllib.parse import unquote, urlsplit, urlunsplit

REDACTED = "REDACTED"
# Query / fragment parameter names that hold credentials (matched on the lower-cased name with - and _
# removed): api_key, access_token, client_secret, password, X-Amz-Signature, sig, auth, ...
_SECRET_PARAM = re.compile(r"key|token|secret|passw|pwd|signature|^sig$|auth|credential|session|cookie")
# A URL inside free text: scheme://, then everything up to white space or a quote.
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s\"'<>`]+")


def _is_secret_param(name: str) -> bool:
    return bool(_SECRET_PARAM.search(re.sub(r"[-_.]", "", unquote(name).lower())))


def _redact_params(part: str) -> str:
    """``a=1&api_key=xyz`` -> ``a=1&api_key=REDACTED``; parameters are kept in order, others untouched."""
    if not part:
        return part
    out = []
    for item in part.split("&"):
        name, eq, _ = item.partition("=")
        out.append(f"{name}={REDACTED}" if eq and _is_secret_param(name) else item)
    return "&".join(out)


def redact_url(url):
    """``url`` without userinfo and with secret-looking query / fragment parameters replaced by REDACTED.

    Anything that is not a string, or has no ``scheme://``, is returned unchanged.
    """
    if not isinstance(url, str) or "://" not in url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unbalanced IPv6 bracket: keep only the scheme
        return url.split("://", 1)[0] + "://" + REDACTED
    netloc = parts.netloc.rpartition("@")[2]
    query = _redact_params(parts.query)
    fragment = _redact_params(parts.fragment) if "=" in parts.fragment else parts.fragment
    if (netloc, query, fragment) == (parts.netloc, parts.query, parts.fragment):
        return url  # nothing secret: keep the text exactly as written
    return urlunsplit((parts.scheme, netloc, parts.path, query, fragment))


def redact_text(text: str, secrets: list[str] | tuple[str, ...] = ()) -> str:
    """Free text (a log line, an error message, a server's reply) with every URL in it redacted and every
    string of ``secrets`` (see ``url_secrets``) replaced by REDACTED."""
    text = _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


def url_secrets(url: str) -> list[str]:
    """The credential strings inside ``url`` (user name, password, secret parameter values), raw and
    percent-decoded, so that they can be scrubbed from text that does not show them as a URL."""
    if not isinstance(url, str) or "://" not in url:
        return []
    try:
        parts = urlsplit(url)
    except ValueError:
        return []
    found = []
    userinfo = parts.netloc.rpartition("@")[0]
    if userinfo:
        user, _, password = userinfo.partition(":")
        found += [userinfo, user, password]
    for part in (parts.query, parts.fragment):
        for item in part.split("&"):
            name, eq, value = item.partition("=")
            if eq and _is_secret_param(name):
                found.append(value)
    found += [unquote(s) for s in found]
    # very short strings (a one-letter user name) would shred unrelated text; the URL form is still redacted
    return sorted({s for s in found if len(s) >= 3})


class RedactingFilter(logging.Filter):
    """A logging filter that redacts URLs and the given secrets in every record it sees (e.g. on the
    ``httpx`` logger, which logs each request's full URL at INFO)."""

    def __init__(self, secrets: list[str] | tuple[str, ...] = ()):
        super().__init__()
        self.secrets = tuple(secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact_text(message, self.secrets)
        if clean != message:
            record.msg, record.args = clean, None
        return True
