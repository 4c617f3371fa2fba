"""Chat templates from a checkpoint's tokenizer files, rendered as transformers renders them.

Clients send ``messages``; the model was trained on one text layout of them,
written as a Jinja template in ``tokenizer_config.json`` (``chat_template``:
one string, or a list of ``{"name", "template"}``) or, since transformers
4.49, in ``chat_template.jinja``.  :class:`ChatTemplate` renders it the way
``PreTrainedTokenizerBase.apply_chat_template`` does -- a sandboxed Jinja
environment with ``trim_blocks``/``lstrip_blocks``, loop controls, the
``tojson`` filter, ``raise_exception`` and ``strftime_now`` globals, the
tokenizer's special tokens as variables -- so the same messages become the
same prompt text.  The text is then tokenized *without* adding special tokens
(the template writes its own BOS), as ``apply_chat_template(tokenize=True)`` does.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from trtlm.errors import UserError

#: special-token keys of tokenizer_config.json that transformers passes to templates.
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ChatTemplateError(ValueError):
    """The template raised (``raise_exception``) or failed on these messages: a client error."""


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def find_template(directory: Path, name: str | None = None) -> str | None:
    """The chat template of a tokenizer directory, or ``None`` when it has none.

    ``chat_template.jinja`` wins over ``tokenizer_config.json`` (as in
    transformers); a list of named templates yields ``name`` or ``"default"``.
    """
    directory = Path(directory)
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file() and name in (None, "default"):
        return jinja_file.read_text()
    cfg_path = directory / "tokenizer_config.json"
    if not cfg_path.is_file():
        return None
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{cfg_path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    template = cfg.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        return named.get(name or "default")
    return template if isinstance(template, str) and template.strip() else None


class ChatTemplate:
    """A compiled chat template plus the special-token variables it is rendered with."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None, origin: str = "template"):
        import jinja2
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        class GenerationTag(Extension):
            """``{% generation %}...{% endgeneration %}`` (assistant masks in training) renders its body."""

            tags = {"generation"}

            def parse(self, parser):
                lineno = next(parser.stream).lineno
                body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
                return jinja2.nodes.Scope(body, lineno=lineno)

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                           extensions=[GenerationTag, loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise UserError(f"{origin}: the chat template is not valid Jinja ({exc.message}, line {exc.lineno})") \
                from None
        self.source = source
        self.special_tokens = dict(special_tokens or {})

    @classmethod
    def from_directory(cls, directory: Path, override: Path | None = None) -> ChatTemplate | None:
        """The template of a tokenizer directory (``override``: a ``.jinja`` file to use instead)."""
        directory = Path(directory)
        special: dict[str, str] = {}
        cfg_path = directory / "tokenizer_config.json"
        if cfg_path.is_file():
            try:
                cfg = json.loads(cfg_path.read_text())
            except json.JSONDecodeError as exc:
                raise UserError(f"{cfg_path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
            special = {k: t for k in SPECIAL_TOKEN_KEYS if (t := _token_text(cfg.get(k))) is not None}
        if override is not None:
            if not Path(override).is_file():
                raise UserError(f"--chat-template {override}: no such file")
            return cls(Path(override).read_text(), special, origin=str(override))
        source = find_template(directory)
        return None if source is None else cls(source, special, origin=str(directory))

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
               **kwargs: Any) -> str:
        """The prompt text of ``messages``; :class:`ChatTemplateError` when the template rejects them."""
        import jinja2

        variables = {**self.special_tokens, **kwargs}
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **variables)
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(str(exc) or type(exc).__name__) from None
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
            raise ChatTemplateError(f"the chat template failed on these messages ({type(exc).__name__}: {exc})") \
                from None


def encode_rendered(tokenizer, text: str) -> list[int]:
    """Token ids of rendered chat text, no BOS added (the template writes its own special tokens)."""
    ids = list(tokenizer.encode(text))
    if getattr(tokenizer, "add_bos", False) and ids and ids[0] == tokenizer.bos_id:
        ids = ids[1:]
    return ids
