"""Training data: JSONL loading, validation before any training, tokenisation with loss masks.

One format per file, detected from the fields of each line. Every format becomes a chat
conversation (or, for plain prompt/completion text, a prompt and a completion):

- chat / OpenAI fine-tuning format: ``{"messages": [...], "tools"?: [...]}``. Roles
  ``system`` (or ``developer``), ``user``, ``assistant``, ``tool``. An assistant message may
  carry ``tool_calls`` (then ``content`` may be null) and ``weight`` 0 or 1 (0: the turn is
  context, no loss), as OpenAI's fine-tuning API defines them; a ``tool`` message answers a
  call by ``tool_call_id``. OpenAI's legacy ``functions`` / ``function_call`` / ``function``
  role are read as tools too. ``content`` may be a list of text parts.
- prompt/completion: ``{"prompt": str, "completion": str}`` (plain text, loss on the
  completion + EOS), or both as message lists (chat; loss on the completion's turns).
- ShareGPT: ``{"conversations": [{"from": "human"|"gpt"|"system"|..., "value": str}],
  "system"?: str, "tools"?: ...}``; LLaMA-Factory's ``function_call`` / ``observation`` turns
  are a tool call and its result.
- Alpaca: ``{"instruction": str, "input"?: str, "output": str, "system"?: str,
  "history"?: [[instruction, output], ...]}``: the user turn is the instruction, then a blank
  line and the input when there is one; the output is the assistant turn.
- preference (DPO, ORPO, KTO): ``{"prompt": str | messages, "chosen": str | [msg],
  "rejected": ...}``.
- unpaired (KTO): ``{"prompt": str | messages, "completion": str | [msg], "label": bool}``:
  one rated answer per line (thumbs up = true), as ``POST /ab/feedback`` collects them.

Loss is carried by the assistant turns (with their end-of-turn token, so the model learns
to stop): every one of them by default, or only the last (``loss_turns="last"``), never one
with ``weight`` 0. Conversations are rendered by the tokenizer's chat template
(``trainer.chat``; tools through ``tools=``, or a documented fallback when the template has
no tool format).

Everything that can be checked without a tokenizer is checked by ``load_jsonl``; the length
check (``check_lengths``) needs the tokenizer and chat template. Every problem carries the
1-based line number of the JSONL file, so a user can fix the file without guessing.

The masks computed here are the ones training uses (``tokenize_sft``), so the dry-run
rendering (``render_loss_mask``) shows exactly which tokens the optimiser will see.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trainer import chat
from trainer.formats import (
    LOSS_TURNS,
    DataError,
    Example,
    Format,
    LossTurns,
    Message,
    Problem,
    Task,
    parse_line,
)

__all__ = [
    "LOSS_CLOSE",
    "LOSS_OPEN",
    "LOSS_TURNS",
    "DataError",
    "Example",
    "Format",
    "LengthReport",
    "LoadedData",
    "LossTurns",
    "Message",
    "Problem",
    "Task",
    "Tokenized",
    "as_chat_prompt",
    "check_lengths",
    "dataset_hash",
    "dry_run",
    "load_jsonl",
    "prompt_for_generation",
    "render_loss_mask",
    "tokenize_example",
    "tokenize_preference",
    "tokenize_sft",
]

logger = logging.getLogger(__name__)

# Loss spans are drawn between these markers in the dry-run text.
LOSS_OPEN = "[["
LOSS_CLOSE = "]]"
TRUNCATION_MARK = "<<TRUNCATED HERE: the rest is cut by max_length>>"
DRY_RUN_EXAMPLES = 3


@dataclass
class LoadedData:
    """A validated JSONL file."""

    path: Path
    format: Format
    examples: list[Example]
    sha256: str
    n_lines: int  # non-blank lines

    def counts(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "examples": len(self.examples),
            "lines": self.n_lines,
            "format": self.format,
        }
        convs = [e.conversation for e in self.examples if e.conversation is not None]
        if convs:
            out["assistant_turns"] = sum(1 for c in convs for m in c if m["role"] == "assistant")
            out["with_tools"] = sum(1 for e in self.examples if e.tools or _has_tool_turns(e))
        return out


def _has_tool_turns(example: Example) -> bool:
    conv = example.conversation or []
    return any(m.get("tool_calls") or m["role"] == "tool" for m in conv)


@dataclass
class LengthReport:
    """Token counts of a dataset against ``max_length``."""

    max_length: int
    n_examples: int
    n_truncated: int
    longest: int
    mean: float
    truncated_lines: list[int] = field(default_factory=list)


@dataclass
class Tokenized:
    """An example ready for the causal-LM loss: labels are -100 where no loss is taken."""

    line: int
    input_ids: list[int]
    labels: list[int]
    text: str  # the rendered text the ids come from
    offsets: list[tuple[int, int]]
    tool_fallback: bool = False  # tools rendered in chat.py's fallback format

    @property
    def n_loss_tokens(self) -> int:
        return sum(1 for label in self.labels if label != -100)


def dataset_hash(path: str | Path) -> str:
    """sha256 of the file's bytes: the card records it so a result can be traced to its data."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- structure


def load_jsonl(path: str | Path, task: Task | None = None) -> LoadedData:
    """Read and validate a JSONL file; raise DataError listing every problem found.

    ``task`` "sft" accepts every format but preference pairs and rated answers, "dpo"
    preference pairs only, "kto" rated answers (``label``) and preference pairs.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError([Problem(0, "", f"no such file: {path}")], path)
    raw = path.read_bytes()
    problems: list[Problem] = []
    examples: list[Example] = []
    first_format: tuple[Format, int] | None = None
    n_lines = 0
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError([Problem(0, "", f"not UTF-8 text: {exc}")], path) from exc
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        n_lines += 1
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(Problem(lineno, "", f"malformed JSON: {exc.msg} at column {exc.colno}"))
            continue
        if not isinstance(obj, dict):
            problems.append(
                Problem(lineno, "", f"expected a JSON object, got {type(obj).__name__}")
            )
            continue
        found = parse_line(obj, lineno, task, problems)
        if found is None:
            continue
        if first_format is None:
            first_format = (found.format, lineno)
        elif found.format != first_format[0]:
            problems.append(
                Problem(
                    lineno,
                    "",
                    f"format {found.format!r} differs from line {first_format[1]}'s "
                    f"{first_format[0]!r}: one file holds one format",
                )
            )
            continue
        examples.append(found)
    if n_lines == 0:
        problems.append(Problem(0, "", "the dataset is empty: no JSON lines found"))
    if problems:
        raise DataError(problems, path)
    assert first_format is not None
    return LoadedData(
        path=path,
        format=first_format[0],
        examples=examples,
        sha256=hashlib.sha256(raw).hexdigest(),
        n_lines=n_lines,
    )


# --------------------------------------------------------------------------- tokenisation


def as_chat_prompt(prompt: str | list[Message]) -> list[Message]:
    """A DPO/eval prompt as chat messages: a bare string becomes one user turn."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def _tokenize_spans(
    tokenizer: Any,
    text: str,
    spans: list[tuple[int, int]],
    line: int,
    add_special_tokens: bool,
    tool_fallback: bool = False,
) -> Tokenized:
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    labels = []
    for tok_id, (start, end) in zip(ids, offsets, strict=True):
        # A token belongs to a span when it starts inside it; added special tokens have an
        # empty (0, 0) offset and carry no loss unless a span starts at 0.
        inside = end > start and any(s <= start < e for s, e in spans)
        labels.append(tok_id if inside else -100)
    return Tokenized(
        line=line,
        input_ids=ids,
        labels=labels,
        text=text,
        offsets=offsets,
        tool_fallback=tool_fallback,
    )


def tokenize_sft(example: Example, tokenizer: Any, loss_turns: LossTurns = "all") -> Tokenized:
    """Token ids and labels for SFT: loss on the trained assistant turns (``loss_turns``:
    every one, or only the last; never one of weight 0), or on a plain completion."""
    conversation = example.conversation
    if conversation is not None:
        try:
            rendered = chat.render(
                tokenizer, conversation, example.trained_turns(loss_turns), example.tools
            )
        except chat.TemplateError as exc:
            raise ValueError(str(exc)) from exc
        return _tokenize_spans(
            tokenizer,
            rendered.text,
            rendered.spans,
            example.line,
            add_special_tokens=False,
            tool_fallback=rendered.tool_fallback,
        )
    if example.format == "prompt_completion":
        assert isinstance(example.prompt, str) and isinstance(example.completion, str)
        eos = tokenizer.eos_token or ""
        completion = example.completion
        if eos and not completion.endswith(eos):
            completion += eos
        text = example.prompt + completion
        spans = [(len(example.prompt), len(text))]
        return _tokenize_spans(tokenizer, text, spans, example.line, add_special_tokens=True)
    raise ValueError(f"line {example.line}: {example.format} data is not SFT data")


def _tokenize_answer(example: Example, answer: str, tokenizer: Any) -> Tokenized:
    """The example's prompt as chat turns, then ``answer`` as the assistant's, masked to it."""
    assert example.prompt is not None
    prompt = as_chat_prompt(example.prompt)
    messages = prompt + [{"role": "assistant", "content": answer}]
    flags = [False] * len(prompt) + [True]
    try:
        rendered = chat.render(tokenizer, messages, flags)
    except chat.TemplateError as exc:
        raise ValueError(str(exc)) from exc
    return _tokenize_spans(
        tokenizer, rendered.text, rendered.spans, example.line, add_special_tokens=False
    )


def tokenize_preference(example: Example, tokenizer: Any) -> tuple[Tokenized, Tokenized]:
    """Chosen and rejected sequences of a preference pair, each masked to its answer."""
    assert example.chosen is not None
    return (
        _tokenize_answer(example, example.chosen, tokenizer),
        _tokenize_answer(example, example.rejected or "", tokenizer),
    )


def prompt_for_generation(example: Example, tokenizer: Any) -> tuple[str, bool]:
    """The text to feed the model to answer this example, and whether it already holds
    the special tokens (rendered by the chat template) or needs them added."""
    conversation = example.conversation
    if conversation is not None:
        return chat.render_prompt(tokenizer, conversation[:-1], example.tools), True
    if example.format in ("preference", "unpaired"):
        assert example.prompt is not None
        return chat.render_prompt(tokenizer, as_chat_prompt(example.prompt)), True
    return str(example.prompt), False


def tokenize_example(
    example: Example, tokenizer: Any, loss_turns: LossTurns = "all"
) -> tuple[Tokenized, ...]:
    """The sequences training sees for one example, masked as in training: an SFT example,
    or both answers of a preference pair (DPO's loss runs over chosen and rejected)."""
    if example.format == "preference":
        return tokenize_preference(example, tokenizer)
    if example.format == "unpaired":  # one rated answer (KTO)
        return (_tokenize_answer(example, str(example.completion), tokenizer),)
    return (tokenize_sft(example, tokenizer, loss_turns),)


# --------------------------------------------------------------------------- lengths


def check_lengths(
    data: LoadedData, tokenizer: Any, max_length: int, loss_turns: LossTurns = "all"
) -> LengthReport:
    """Count tokens per example with the real template; truncation is reported, and an
    example whose loss tokens would all be cut off is an error (it would train nothing)."""
    problems: list[Problem] = []
    lengths: list[int] = []
    truncated: list[int] = []
    for example in data.examples:
        try:
            seqs = tokenize_example(example, tokenizer, loss_turns)
        except ValueError as exc:
            problems.append(Problem(example.line, "", str(exc)))
            continue
        longest = 0
        for seq in seqs:
            longest = max(longest, len(seq.input_ids))
            if seq.n_loss_tokens == 0:
                problems.append(Problem(example.line, "", "no token carries loss after rendering"))
            elif all(label == -100 for label in seq.labels[:max_length]):
                first = next(i for i, lab in enumerate(seq.labels) if lab != -100)
                problems.append(
                    Problem(
                        example.line,
                        "",
                        f"the prompt alone is {first} tokens, at or past max_length={max_length}: "
                        "the answer would be cut off entirely. Shorten it or raise max_length",
                    )
                )
        lengths.append(longest)
        if longest > max_length:
            truncated.append(example.line)
    if problems:
        raise DataError(problems, data.path)
    report = LengthReport(
        max_length=max_length,
        n_examples=len(lengths),
        n_truncated=len(truncated),
        longest=max(lengths) if lengths else 0,
        mean=sum(lengths) / len(lengths) if lengths else 0.0,
        truncated_lines=truncated[:50],
    )
    if truncated:
        logger.warning(
            "%d of %d examples exceed max_length=%d tokens and will be truncated (lines %s)",
            len(truncated),
            len(lengths),
            max_length,
            ", ".join(map(str, truncated[:10])),
        )
    return report


# --------------------------------------------------------------------------- dry run


def render_loss_mask(seq: Tokenized, max_length: int | None = None) -> str:
    """The rendered text with the loss-carrying tokens between [[ and ]].

    Tokens past ``max_length`` are shown after a truncation marker, so a reader sees what
    the optimiser will and will not see.
    """
    pieces: list[str] = []
    inside = False
    cursor = 0
    for i, ((start, end), label) in enumerate(zip(seq.offsets, seq.labels, strict=True)):
        if max_length is not None and i == max_length:
            if inside:
                pieces.append(LOSS_CLOSE)
                inside = False
            pieces.append(seq.text[cursor:start])
            pieces.append(TRUNCATION_MARK)
            cursor = start
        if end <= start:  # an added special token with no text of its own
            continue
        carries = label != -100 and (max_length is None or i < max_length)
        pieces.append(seq.text[cursor:start])
        if carries and not inside:
            pieces.append(LOSS_OPEN)
            inside = True
        elif not carries and inside:
            pieces.append(LOSS_CLOSE)
            inside = False
        pieces.append(seq.text[start:end])
        cursor = end
    if inside:
        pieces.append(LOSS_CLOSE)
    pieces.append(seq.text[cursor:])
    return "".join(pieces)


def dry_run(
    data_path: str | Path,
    tokenizer: Any,
    max_length: int,
    task: Task = "sft",
    loss_turns: LossTurns = "all",
    n_examples: int = DRY_RUN_EXAMPLES,
) -> dict[str, Any]:
    """Validate the data and render its first ``n_examples`` with the loss mask marked.

    Returns a dict with counts, the length report, ``examples`` (line, tokens, loss tokens,
    rendered text each) and ``rendered`` (all of them as one text). Raises DataError.
    """
    data = load_jsonl(data_path, task)
    report = check_lengths(data, tokenizer, max_length, loss_turns)
    shown: list[dict[str, Any]] = []
    blocks: list[str] = []
    fallback = False
    for example in data.examples[:n_examples]:
        if example.format == "preference":
            chosen, rejected = tokenize_preference(example, tokenizer)
            text = (
                f"--- line {example.line}, chosen ---\n{render_loss_mask(chosen, max_length)}\n"
                f"--- line {example.line}, rejected ---\n{render_loss_mask(rejected, max_length)}"
            )
            n_tokens, n_loss = len(chosen.input_ids), chosen.n_loss_tokens
        else:
            (seq,) = tokenize_example(example, tokenizer, loss_turns)
            fallback = fallback or seq.tool_fallback
            n_tokens, n_loss = len(seq.input_ids), seq.n_loss_tokens
            rated = "" if example.label is None else f", label {str(example.label).lower()}"
            text = (
                f"--- line {example.line}{rated}: {n_tokens} tokens, {n_loss} carry loss ---\n"
                f"{render_loss_mask(seq, max_length)}"
            )
        shown.append(
            {"line": example.line, "tokens": n_tokens, "loss_tokens": n_loss, "rendered": text}
        )
        blocks.append(text)
    first = shown[0]
    return {
        "path": str(data.path),
        "sha256": data.sha256,
        "counts": data.counts(),
        "lengths": asdict(report),
        "loss_turns": loss_turns,
        "first_line": first["line"],
        "first_tokens": first["tokens"],
        "first_loss_tokens": first["loss_tokens"],
        "examples": shown,
        "rendered": "\n".join(blocks),
        "tool_fallback": fallback,
        "legend": f"text between {LOSS_OPEN} and {LOSS_CLOSE} carries loss; the rest is context",
    }
