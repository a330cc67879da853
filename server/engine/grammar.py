"""Constrained decoding, per row: each row of the running batch carries its own grammar
state and token mask, so constrained and free rows, on any adapters, share one decode step.

Built on llguidance (an Earley parser over a lazy lexer, in Rust): a grammar costs
milliseconds to compile, and a mask a fraction of a millisecond per row and step. What is
slow is teaching it the model's vocabulary (every token's bytes, a few seconds for a
262k-token vocabulary): done once, on the first request that needs it, off the scheduler
thread. Compiled grammars are cached by their spec; every row gets its own copy.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from server.engine.base import EngineError, StructuredOutput
from server.engine.structured import grammar_text

logger = logging.getLogger(__name__)


class GrammarError(EngineError):
    status = 400
    code = "invalid_grammar"
    param = "response_format"


class RowGrammar:
    """One row's grammar state: which tokens may come next, and the tokens taken so far."""

    def __init__(self, matcher: Any):
        self.matcher = matcher

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed-token bits (one per token id) into bitmask[row]."""
        v = bitmask[row]
        self.matcher.unsafe_compute_mask_ptr(v.data_ptr(), v.numel() * v.element_size())

    def accept(self, token: int) -> None:
        if not self.matcher.is_stopped():
            self.matcher.consume_token(token)

    @property
    def finished(self) -> bool:
        """The grammar is complete and allows nothing more (or it failed)."""
        return bool(self.matcher.is_stopped() or self.matcher.is_error())


def new_bitmask(rows: int, vocab: int) -> torch.Tensor:
    return torch.zeros((rows, (vocab + 31) // 32), dtype=torch.int32)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """logits (vocab,) float32, in place: -inf for every token whose bit is 0."""
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), bitorder="little")
    allowed = torch.from_numpy(bits[: logits.shape[-1]]).bool()
    logits.masked_fill_(~allowed, float("-inf"))


class GrammarCompiler:
    """The tokenizer in llguidance's form, and compiled grammars cached by spec."""

    def __init__(
        self, token_table: Any, tokenize: Any, *, eos_token_id: int, cache_size: int = 128
    ):
        # token_table: () -> (bytes per id, special ids); built lazily, shared with logprobs
        self._token_table = token_table
        self._tokenize = tokenize  # text -> token ids, no special tokens added
        self.eos_token_id = eos_token_id
        self.cache_size = cache_size
        self._ll_tokenizer: Any = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self.compiled = 0
        self.cache_hits = 0

    def _tokenizer(self) -> Any:
        with self._lock:
            if self._ll_tokenizer is None:
                import llguidance

                start = time.monotonic()
                tokens, special = self._token_table()
                eos, bos = self.eos_token_id, None
                tokenize = self._tokenize

                class _Vocab:
                    # what llguidance.TokenizerWrapper reads
                    eos_token_id = eos
                    bos_token_id = bos
                    special_token_ids = special

                    def __init__(self) -> None:
                        self.tokens = tokens

                    def __call__(self, text: Any) -> list[int]:
                        # the library tokenizes text the grammar forces (e.g. `{"a":`)
                        if isinstance(text, bytes):
                            text = text.decode("utf-8", errors="replace")
                        return list(tokenize(text))

                self._ll_tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Vocab()))
                logger.info(
                    "grammar: vocabulary of %d tokens ready in %.1f s",
                    len(tokens),
                    time.monotonic() - start,
                )
            return self._ll_tokenizer

    def compile(self, spec: StructuredOutput) -> RowGrammar:
        """A fresh row grammar for this spec (a copy of the cached compiled one)."""
        from llguidance import LLMatcher

        key = spec.key()
        with self._lock:
            template = self._cache.get(key)
            if template is not None:
                self._cache.move_to_end(key)
                self.cache_hits += 1
                return RowGrammar(template.deep_copy())
        tokenizer = self._tokenizer()
        try:
            text = grammar_text(spec)
        except (ValueError, TypeError) as exc:
            raise GrammarError(f"the grammar library cannot compile this schema: {exc}") from exc
        template = LLMatcher(tokenizer, text, log_level=0)
        if template.is_error():
            raise GrammarError(
                f"the grammar library cannot compile this schema: {template.get_error()}"
            )
        with self._lock:
            self._cache[key] = template
            self.compiled += 1
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return RowGrammar(template.deep_copy())
