"""The ``chat_template`` setting of a target: its tokenizer's own template, another one, or plain text.

Many GGUF files and base models ship a tokenizer without a chat template. ``TargetSpec.chat_template``
(``chat_template=`` in data_prep) supplies one, and every stage that loads the target through
``dspark_model.target.load_tokenizer`` renders prompts with it:

* ``None``: the tokenizer's own template;
* a path to a file (``.jinja`` or any text file) or a Jinja template string (it contains ``{{`` or ``{%``);
* ``plain``: no chat markup. The prompt is the raw user text, the answer is the target's continuation of it,
  followed by the EOS token when the target stopped. Later turns follow a blank line; a system message
  comes first, also followed by a blank line.
"""

from __future__ import annotations

from pathlib import Path

PLAIN = "plain"

# Assistant text follows the prompt directly (a continuation); other messages are separated by a blank line.
# The EOS after an answer is what the target emits when it stops, so the loss mask can cover it.
_PLAIN_BODY = (
    "{% for m in messages %}"
    "{% if not loop.first and m['role'] != 'assistant' %}{{ '\n\n' }}{% endif %}"
    "{{ m['content'] }}"
    "{% if m['role'] == 'assistant' and eos_token %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)


class ChatTemplateError(ValueError):
    """The chat_template setting names neither a readable file nor a Jinja template."""


def plain_template(tokenizer) -> str:
    """The plain-continuation template; starts with BOS when the tokenizer puts one before plain text."""
    bos = getattr(tokenizer, "bos_token_id", None)
    with_bos = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    adds_bos = bos is not None and with_bos[:1] == [bos] and without[:1] != [bos]
    return ("{{ bos_token }}" if adds_bos else "") + _PLAIN_BODY


def is_plain(setting: str | None) -> bool:
    return setting is not None and setting.strip().lower() == PLAIN


def template_source(setting: str | None) -> str:
    """What a setting names, for manifests: "tokenizer", "plain", "inline" (Jinja text) or the file path."""
    if setting is None:
        return "tokenizer"
    if is_plain(setting):
        return PLAIN
    return "inline" if "{{" in setting or "{%" in setting else setting


def resolve_chat_template(setting: str, tokenizer) -> str:
    """The Jinja text a ``chat_template`` setting stands for (see the module docstring)."""
    if is_plain(setting):
        return plain_template(tokenizer)
    if "{{" in setting or "{%" in setting:
        return setting
    path = Path(setting).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    raise ChatTemplateError(f"chat_template={setting!r} is neither a file nor a Jinja template; pass a path to a "
                            f"template file, the template text itself, or chat_template=plain for raw text")


def apply_chat_template_setting(tokenizer, setting: str | None):
    """Install the template a setting names on ``tokenizer`` (None keeps the tokenizer's own)."""
    if setting:
        tokenizer.chat_template = resolve_chat_template(setting, tokenizer)
    return tokenizer
