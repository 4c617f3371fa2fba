"""Tokenizers for ``trtlm run``: ``tokenizer.json`` (the tokenizers library) or
Mistral's own ``tokenizer.model`` files (mistral-common, optional)."""
from __future__ import annotations

import json
from pathlib import Path

from trtlm.errors import UserError


class Tokenizer:
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()
    add_bos: bool = False

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError  # abstract

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError  # abstract


class HFTokenizer(Tokenizer):
    """``tokenizer.json`` through the tokenizers library (no transformers needed)."""

    def __init__(self, directory: Path):
        from tokenizers import Tokenizer as _Tok

        self._tok = _Tok.from_file(str(directory / "tokenizer.json"))
        cfg_path = directory / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        bos, eos = cfg.get("bos_token"), cfg.get("eos_token")
        bos = bos.get("content") if isinstance(bos, dict) else bos
        eos = eos.get("content") if isinstance(eos, dict) else eos
        self.bos_id = self._tok.token_to_id(bos) if bos else None
        eos_id = self._tok.token_to_id(eos) if eos else None
        self.eos_ids = (eos_id,) if eos_id is not None else ()
        self.add_bos = bool(cfg.get("add_bos_token", False)) and self.bos_id is not None

    def encode(self, text: str) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] + ids) if self.add_bos else ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


class MistralCommonTokenizer(Tokenizer):
    """Mistral's ``tokenizer.model`` (SentencePiece) or ``tekken.json`` via mistral-common."""

    def __init__(self, path: Path):
        try:
            from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
        except ImportError:
            raise UserError(f"{path}: reading Mistral tokenizer files needs mistral-common: "
                            f"pip install 'trtlm[mistral]'") from None
        self._tok = MistralTokenizer.from_file(str(path)).instruct_tokenizer.tokenizer
        self.bos_id = self._tok.bos_id
        self.eos_ids = (self._tok.eos_id,)
        self.add_bos = True

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, bos=True, eos=False)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


def load_tokenizer(directory: Path) -> Tokenizer:
    if (directory / "tokenizer.json").exists():
        return HFTokenizer(directory)
    for name in ("tekken.json", "tokenizer.model.v3", "tokenizer.model"):
        if (directory / name).exists():
            return MistralCommonTokenizer(directory / name)
    raise UserError(f"{directory}: no tokenizer.json, tokenizer.model or tekken.json; pass --tokenizer-dir "
                    f"or give --input-ids")
