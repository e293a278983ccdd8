"""The tokenizer, with the chat template chosen by `policy.tokenizer.chat_template`.

- "default" (or the key absent): the tokenizer's own template; an error if it has none.
- None (`null` in YAML): passthrough, the message contents concatenated with nothing added.
- an inline Jinja string (it contains `{{` or `{%`).
- a path to a template file (`templates/chat.jinja`); an error naming the path if it is missing.
"""

from __future__ import annotations

import os
import re

from nemo_rl.config.schema import TokenizerConfig

PASSTHROUGH_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"


def get_tokenizer(tokenizer_cfg: TokenizerConfig, trust_remote_code: bool = False):
    """AutoTokenizer for `tokenizer_cfg.name` with its chat template set per the config.

    A tokenizer without a pad token gets its EOS token as pad (collation pads on the right, and
    padded positions never carry loss).
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_cfg.name, trust_remote_code=trust_remote_code)
    tokenizer.chat_template = resolve_chat_template(
        tokenizer_cfg.chat_template, tokenizer.chat_template, tokenizer_cfg.name
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resolve_chat_template(choice: str | None, own_template: str | None, tokenizer_name: str) -> str:
    """The Jinja source for a `policy.tokenizer.chat_template` value."""
    key = "policy.tokenizer.chat_template"
    if choice == "default":
        if not own_template:
            raise ValueError(
                f"{key}='default' but the tokenizer {tokenizer_name!r} has no chat template; set {key} to null "
                "(passthrough: contents concatenated), an inline Jinja string, or a path to a .jinja file"
            )
        if isinstance(own_template, dict):  # several named templates: the "default" one
            if "default" not in own_template:
                raise ValueError(
                    f"{key}='default': the tokenizer {tokenizer_name!r} has named templates {sorted(own_template)} "
                    "and none is called 'default'; set the one you want as an inline string or a .jinja file"
                )
            return own_template["default"]
        return own_template
    if choice is None:
        return PASSTHROUGH_TEMPLATE
    if "{{" in choice or "{%" in choice:
        source, origin = choice, "the inline template"
    else:
        path = os.path.expanduser(choice)
        if not os.path.isfile(path):
            raise ValueError(
                f"{key}={choice!r}: no such template file (a value without '{{{{' or '{{%' is read as a path to "
                f"a .jinja file; use 'default' for the tokenizer's own template or null for passthrough)"
            )
        with open(path, encoding="utf-8") as handle:
            source, origin = handle.read(), path
    _check_syntax(source, f"{key}: {origin}")
    return source


def _check_syntax(source: str, origin: str) -> None:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    environment = ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"])
    # transformers' `{% generation %}` tag is an extension of its own; check the template around it.
    try:
        environment.parse(re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", source))
    except jinja2.TemplateSyntaxError as error:
        raise ValueError(
            f"{origin} is not valid Jinja: {error.message} (template line {error.lineno})"
        ) from error
