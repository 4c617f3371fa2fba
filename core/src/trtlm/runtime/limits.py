"""What prompt an engine can take, as plain numbers: checked where the request arrives.

The engine checks every request against its :class:`PromptLimits`; a server
whose engine runs in another process holds a copy of the same limits (sent
once when the engine is ready), so a prompt the engine would refuse is refused
with the same message before it crosses the process boundary.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from trtlm.errors import UserError


@dataclass(frozen=True)
class PromptLimits:
    vocab_size: int
    max_input_len: int
    max_seq_len: int
    block_size: int
    num_blocks: int  #: KV blocks in the cache
    max_batch_size: int
    chunked_prefill: bool
    max_num_tokens: int

    def check(self, ids: list[int], params: Any) -> None:
        """One clear error for a prompt (token ids) and sampling params this engine cannot run."""
        if not ids:
            raise UserError("empty prompt: give at least one token")
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise UserError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        if len(ids) > self.max_input_len:
            raise UserError(f"prompt of {len(ids)} tokens is longer than the engine's max_input_len "
                            f"{self.max_input_len} (rebuild with a larger --max-input-len)")
        if len(ids) + params.max_tokens > self.max_seq_len:
            raise UserError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) = "
                            f"{len(ids) + params.max_tokens} exceeds the engine's max_seq_len {self.max_seq_len}")
        need = params.n * -(-(len(ids) + params.max_tokens) // self.block_size)
        if need > self.num_blocks:
            raise UserError(f"the request needs {need} KV blocks and the cache has {self.num_blocks}: "
                            f"raise --kv-cache-gb / --kv-cache-free-gpu-mem-fraction or lower max_tokens")
        if params.n > self.max_batch_size:
            raise UserError(f"n={params.n} completions exceed --max-batch-size {self.max_batch_size} "
                            f"(each completion is a sequence of the batch)")
        if not self.chunked_prefill and len(ids) > self.max_num_tokens:
            raise UserError(f"prompt of {len(ids)} tokens exceeds --max-num-tokens {self.max_num_tokens} "
                            f"and chunked prefill is off")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
