"""Each token id's own bytes, read from a Hugging Face fast tokenizer.

Log probabilities report a token's bytes (OpenAI's `bytes`), and the grammar library needs
the bytes of every token of the vocabulary to know which tokens a grammar allows next.
Decoding one id at a time cannot give them: a byte-fallback piece such as `<0xE2>` is a
third of a UTF-8 character, and decodes to U+FFFD alone.
"""

from __future__ import annotations

import re
from typing import Any

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte <-> printable character map, inverted (byte-level BPE pieces)."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def _is_byte_level(tokenizer: Any) -> bool:
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    return "ByteLevel" in repr(decoder)


def token_bytes_table(tokenizer: Any, vocab_size: int) -> tuple[list[bytes], list[int]]:
    """(bytes of every id below vocab_size, ids of special tokens).

    Special tokens (`<eos>`, `<end_of_turn>`, ...) get their text; ids past the tokenizer's
    vocabulary (padding rows of the output layer) get b"".
    """
    pieces = tokenizer.convert_ids_to_tokens(list(range(min(len(tokenizer), vocab_size))))
    added = tokenizer.added_tokens_decoder  # a property that builds a dict: read it once
    special = [i for i, tok in added.items() if tok.special and i < vocab_size]
    special_set = set(special)
    byte_level = _is_byte_level(tokenizer)
    byte_map = _byte_level_decoder() if byte_level else {}
    out: list[bytes] = []
    for i, piece in enumerate(pieces):
        if piece is None:
            out.append(b"")
        elif i in special_set or i in added:
            out.append(piece.encode())
        elif byte_level:
            try:
                out.append(bytes(byte_map[c] for c in piece))
            except KeyError:
                out.append(piece.encode())
        else:  # SentencePiece style: "▁" is a space, <0xNN> one raw byte
            m = _BYTE_PIECE.match(piece)
            out.append(bytes([int(m.group(1), 16)]) if m else piece.replace("\u2581", " ").encode())
    out.extend([b""] * (vocab_size - len(out)))
    return out, special
