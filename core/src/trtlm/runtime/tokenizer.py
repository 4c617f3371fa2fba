"""Tokenizers for ``trtlm run``: ``tokenizer.json`` (the tokenizers library) or
Mistral's own ``tokenizer.model`` files (mistral-common, optional)."""
from __future__ import annotations

import abc
import json
import re
from pathlib import Path

from trtlm.errors import UserError


class Tokenizer(abc.ABC):
    """What generation needs from a tokenizer: ids in, text out, BOS/EOS ids."""

    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()
    add_bos: bool = False

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (with BOS when the tokenizer adds one)."""

    @abc.abstractmethod
    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``, special tokens skipped."""


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
    """Mistral's ``tokenizer.model*`` (SentencePiece) or ``tekken*.json`` via mistral-common.

    mistral-common reads the tokenizer *version* from the file name
    (``.model.v3``, ``.model.v7m1``; a bare ``.model`` is v1), so files are
    used under their own names, never renamed.
    """

    def __init__(self, path: Path):
        try:
            from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
        except ImportError:
            raise UserError(f"{path}: reading Mistral tokenizer files needs mistral-common: "
                            f"pip install 'trtlm[mistral]'") from None
        try:
            self._tok = MistralTokenizer.from_file(str(path)).instruct_tokenizer.tokenizer
        except ImportError as exc:  # SentencePiece files need the optional sentencepiece package
            raise UserError(f"{path}: {exc}") from None
        except Exception as exc:  # mistral-common raises its own types for unreadable files
            raise UserError(f"{path}: not a Mistral tokenizer file mistral-common can read "
                            f"({type(exc).__name__}: {exc})") from None
        self.path = path
        self.bos_id = self._tok.bos_id
        self.eos_ids = (self._tok.eos_id,)
        self.add_bos = True

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, bos=True, eos=False)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


#: Hugging Face tokenizer files (and the generation config) carried with checkpoints and engines.
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                      "generation_config.json", "chat_template.jinja", "chat_template.json")
_SPM = re.compile(r"\.model(?:\.v(\d+)(?:m(\d+))?)?$")


def mistral_tokenizer_files(directory: Path) -> list[Path]:
    """Mistral tokenizer files of ``directory``, the preferred one first.

    Names vary (``tokenizer.model``, ``tokenizer.model.v3``, ``tekken.json``,
    ``mistral_instruct_tokenizer_240323.model.v3``, ``tekken_240911.json``...):
    tekken files (``*tekken*.json``) come first, newest name last-sorted first;
    then SentencePiece models by version, highest first, a bare ``.model`` (v1) last.
    """
    if not directory.is_dir():
        return []
    tekken, spm = [], []
    for f in directory.iterdir():
        if not f.is_file():
            continue
        if "tekken" in f.name and f.suffix == ".json":
            tekken.append(f)
        elif (m := _SPM.search(f.name)) is not None:
            spm.append(((int(m.group(1) or 1), int(m.group(2) or 0), f.name), f))
    return sorted(tekken, key=lambda f: f.name, reverse=True) + [f for _, f in sorted(spm, reverse=True)]


def tokenizer_files(directory: Path) -> list[Path]:
    """Every tokenizer file of ``directory`` worth carrying along with a converted model."""
    found = [directory / n for n in HF_TOKENIZER_FILES if (directory / n).is_file()]
    return found + mistral_tokenizer_files(directory)


def load_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer of a model directory (or one tokenizer file).

    ``tokenizer.json`` (Hugging Face) wins; otherwise a Mistral tokenizer file
    as :func:`mistral_tokenizer_files` orders them.
    """
    path = Path(path)
    if path.is_file():
        return HFTokenizer(path.parent) if path.name == "tokenizer.json" else MistralCommonTokenizer(path)
    if (path / "tokenizer.json").exists():
        return HFTokenizer(path)
    candidates = mistral_tokenizer_files(path)
    if candidates:
        return MistralCommonTokenizer(candidates[0])
    raise UserError(f"{path}: no tokenizer.json, tokenizer.model* or tekken*.json; pass --tokenizer-dir "
                    f"or give --input-ids")
