"""The engine's token log probabilities in OpenAI's two shapes: chat's `logprobs.content`
(token, logprob, bytes, top_logprobs) and completions' legacy arrays (tokens,
token_logprobs, top_logprobs, text_offset) that lm-evaluation-harness reads."""

from __future__ import annotations

from server.engine.base import Logprob, TokenLogprobs
from server.errors import APIError
from server.protocol import ChoiceLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob

MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's top_logprobs (and vLLM's default)


def token_text(lp: Logprob) -> str:
    """The token's text; a piece that is part of one UTF-8 character is written
    `bytes:\\xe2\\x80` (vLLM's convention), so alternatives keep distinct keys."""
    try:
        return lp.token_bytes.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in lp.token_bytes)


def _top(lp: Logprob) -> TopLogprob:
    return TopLogprob(token=token_text(lp), logprob=lp.logprob or 0.0, bytes=list(lp.token_bytes))


def chat_logprobs(entries: list[TokenLogprobs]) -> ChoiceLogprobs:
    content = [
        TokenLogprob(**_top(e.chosen).model_dump(), top_logprobs=[_top(t) for t in e.top])
        for e in entries
    ]
    return ChoiceLogprobs(content=content)


def completion_logprobs(
    entries: list[TokenLogprobs], start_offset: int = 0, *, echo_text: str | None = None
) -> CompletionLogprobs:
    """A prompt's first token (echo) has logprob None and top_logprobs None. `echo_text`:
    the prompt as echoed; a first token it does not start with (the `<bos>` the server
    added to a text prompt) takes no room in text_offset."""
    out = CompletionLogprobs()
    offset = start_offset
    for i, e in enumerate(entries):
        text = token_text(e.chosen)
        out.tokens.append(text)
        out.token_logprobs.append(e.chosen.logprob)
        out.text_offset.append(offset)
        if not (i == 0 and echo_text is not None and not echo_text.startswith(text)):
            offset += len(text)
        if e.chosen.logprob is None:
            out.top_logprobs.append(None)
            continue
        # the sampled token is always listed, so there may be logprobs + 1 (as OpenAI's)
        top = {token_text(t): t.logprob or 0.0 for t in e.top}
        top.setdefault(text, e.chosen.logprob)
        out.top_logprobs.append(top)
    return out


def check_count(value: int, param: str) -> int:
    if not 0 <= value <= MAX_LOGPROBS:
        raise APIError(400, f"{param} must be between 0 and {MAX_LOGPROBS}", param=param)
    return value
