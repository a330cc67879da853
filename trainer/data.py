"""Training data: JSONL loading, validation before any training, tokenisation with loss masks.

Three formats, one per file, detected from the fields of each line:

- chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``
  (optional system first, then user/assistant alternating, ending with assistant).
  Loss is carried by every assistant turn and nothing else.
- prompt/completion: ``{"prompt": str, "completion": str}`` (plain text, loss on the
  completion + EOS), or both as message lists (chat; loss on the completion's turns).
- preference (DPO, ORPO, KTO): ``{"prompt": str | messages, "chosen": str | [msg], "rejected": ...}``.
- unpaired (KTO): ``{"prompt": str | messages, "completion": str | [msg], "label": bool}``:
  one rated answer per line (thumbs up = true), as ``POST /ab/feedback`` collects them.

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
from typing import Any, Literal

logger = logging.getLogger(__name__)

Format = Literal["chat", "prompt_completion", "preference", "unpaired"]
# sft: chat or prompt/completion; dpo: preference pairs; kto: unpaired ratings or pairs
Task = Literal["sft", "dpo", "kto"]

ROLES = ("system", "user", "assistant")
# Loss spans are drawn between these markers in the dry-run text.
LOSS_OPEN = "[["
LOSS_CLOSE = "]]"
TRUNCATION_MARK = "<<TRUNCATED HERE: the rest is cut by max_length>>"
MAX_PROBLEMS_IN_MESSAGE = 20


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the data: where (line, field) and what."""

    line: int  # 1-based line of the JSONL file; 0 for the file as a whole
    field: str
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line else "file"
        return (
            f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"
        )


class DataError(ValueError):
    """The training data is unusable; ``problems`` lists every problem found."""

    def __init__(self, problems: list[Problem], path: str | Path | None = None):
        self.problems = list(problems)
        self.path = str(path) if path is not None else None
        shown = "\n".join(f"  {p}" for p in self.problems[:MAX_PROBLEMS_IN_MESSAGE])
        more = len(self.problems) - MAX_PROBLEMS_IN_MESSAGE
        tail = f"\n  ... and {more} more" if more > 0 else ""
        where = f" in {self.path}" if self.path else ""
        super().__init__(f"{len(self.problems)} problem(s){where}:\n{shown}{tail}")

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "problems": [asdict(p) for p in self.problems]}


@dataclass
class Example:
    """One validated line, normalised: chat turns as message lists, plain text as strings."""

    line: int
    format: Format
    messages: list[dict[str, str]] | None = None  # chat
    prompt: str | list[dict[str, str]] | None = None  # prompt/completion and preference
    completion: str | list[dict[str, str]] | None = None
    chosen: str | None = None  # preference: the assistant's preferred answer
    rejected: str | None = None
    label: bool | None = None  # unpaired: whether ``completion`` is a desirable answer

    def reference_answer(self) -> str:
        """The answer a model should give to this example's prompt (for eval)."""
        if self.format == "chat":
            assert self.messages is not None
            return self.messages[-1]["content"]
        if self.format == "preference":
            assert self.chosen is not None
            return self.chosen
        if isinstance(self.completion, list):
            return "".join(m["content"] for m in self.completion)
        return str(self.completion)


@dataclass
class LoadedData:
    """A validated JSONL file."""

    path: Path
    format: Format
    examples: list[Example]
    sha256: str
    n_lines: int  # non-blank lines

    def counts(self) -> dict[str, Any]:
        return {"examples": len(self.examples), "lines": self.n_lines, "format": self.format}


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

    ``task`` "sft" accepts chat and prompt/completion, "dpo" accepts preference pairs only,
    "kto" accepts unpaired ratings and preference pairs.
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
        found = _parse_line(obj, lineno, task, problems)
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


def _parse_line(
    obj: dict[str, Any], line: int, task: Task | None, problems: list[Problem]
) -> Example | None:
    before = len(problems)
    if "label" in obj:
        return _unpaired_line(obj, line, task, problems)
    if "chosen" in obj or "rejected" in obj:
        if task == "sft":
            problems.append(
                Problem(line, "chosen", "preference pairs are DPO data; use `train dpo` for them")
            )
            return None
        for name in ("prompt", "chosen", "rejected"):
            if name not in obj:
                problems.append(Problem(line, name, "missing (preference pairs need all three)"))
        if len(problems) > before:
            return None
        prompt = _prompt_field(obj["prompt"], line, problems)
        chosen = _answer_field(obj["chosen"], line, "chosen", problems)
        rejected = _answer_field(obj["rejected"], line, "rejected", problems)
        if len(problems) > before:
            return None
        if chosen == rejected:
            problems.append(
                Problem(line, "rejected", "identical to chosen: the pair teaches nothing")
            )
            return None
        return Example(line, "preference", prompt=prompt, chosen=chosen, rejected=rejected)

    if task in ("dpo", "kto"):
        needs = (
            "DPO needs {prompt, chosen, rejected} on every line"
            if task == "dpo"
            else "KTO needs {prompt, completion, label} or {prompt, chosen, rejected} on every line"
        )
        problems.append(Problem(line, "chosen" if task == "dpo" else "label", f"missing: {needs}"))
        return None

    if "messages" in obj:
        messages = _messages(obj["messages"], line, "messages", problems)
        if messages is None:
            return None
        _check_order(messages, line, "messages", problems, end="assistant")
        if len(problems) > before:
            return None
        return Example(line, "chat", messages=messages)

    if "prompt" in obj or "completion" in obj:
        for name in ("prompt", "completion"):
            if name not in obj:
                problems.append(Problem(line, name, "missing (needs both prompt and completion)"))
        if len(problems) > before:
            return None
        prompt, completion = obj["prompt"], obj["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            if not prompt.strip():
                problems.append(Problem(line, "prompt", "empty string"))
            if not completion.strip():
                problems.append(Problem(line, "completion", "empty string: nothing to learn"))
            if len(problems) > before:
                return None
            return Example(line, "prompt_completion", prompt=prompt, completion=completion)
        if isinstance(prompt, list) and isinstance(completion, list):
            p = _messages(prompt, line, "prompt", problems)
            c = _messages(completion, line, "completion", problems)
            if p is None or c is None:
                return None
            _check_order(p + c, line, "prompt+completion", problems, end="assistant")
            if c and c[0]["role"] != "assistant":
                problems.append(Problem(line, "completion", "must start with an assistant turn"))
            if len(problems) > before:
                return None
            return Example(line, "prompt_completion", prompt=p, completion=c)
        problems.append(
            Problem(
                line,
                "prompt",
                "prompt and completion must both be strings or both be message lists, got "
                f"{type(prompt).__name__} and {type(completion).__name__}",
            )
        )
        return None

    keys = ", ".join(sorted(obj)) or "none"
    problems.append(
        Problem(
            line,
            "",
            f"unknown format (fields: {keys}); expected 'messages', 'prompt'+'completion', "
            "or 'prompt'+'chosen'+'rejected'",
        )
    )
    return None


def _unpaired_line(
    obj: dict[str, Any], line: int, task: Task | None, problems: list[Problem]
) -> Example | None:
    """{prompt, completion, label}: one rated answer (KTO's unpaired preference format)."""
    before = len(problems)
    if task == "sft":
        problems.append(
            Problem(
                line,
                "label",
                "rated answers are KTO data (SFT would learn the thumbs-down answers too): "
                "use `train kto` for them",
            )
        )
        return None
    if task == "dpo":
        problems.append(
            Problem(
                line, "label", "rated single answers are KTO data; DPO needs chosen/rejected pairs"
            )
        )
        return None
    for name in ("prompt", "completion"):
        if name not in obj:
            problems.append(
                Problem(line, name, "missing (a rated answer needs prompt, completion, label)")
            )
    if not isinstance(obj["label"], bool):
        problems.append(
            Problem(line, "label", f"must be true (desirable) or false, got {_kind(obj['label'])}")
        )
    if len(problems) > before:
        return None
    prompt = _prompt_field(obj["prompt"], line, problems)
    completion = _answer_field(obj["completion"], line, "completion", problems)
    if len(problems) > before:
        return None
    return Example(line, "unpaired", prompt=prompt, completion=completion, label=obj["label"])


def _messages(
    value: Any, line: int, name: str, problems: list[Problem]
) -> list[dict[str, str]] | None:
    if not isinstance(value, list):
        problems.append(Problem(line, name, f"must be a list of messages, got {_kind(value)}"))
        return None
    if not value:
        problems.append(Problem(line, name, "empty list of messages"))
        return None
    out: list[dict[str, str]] = []
    ok = True
    for i, msg in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(msg, dict):
            problems.append(Problem(line, where, f"must be an object, got {_kind(msg)}"))
            ok = False
            continue
        role, content = msg.get("role"), msg.get("content")
        if role is None:
            problems.append(Problem(line, f"{where}.role", "missing"))
            ok = False
        elif role not in ROLES:
            problems.append(
                Problem(line, f"{where}.role", f"{role!r} is not one of {', '.join(ROLES)}")
            )
            ok = False
        if content is None:
            problems.append(Problem(line, f"{where}.content", "missing"))
            ok = False
        elif not isinstance(content, str):
            problems.append(
                Problem(line, f"{where}.content", f"must be a string, got {_kind(content)}")
            )
            ok = False
        elif not content.strip():
            problems.append(Problem(line, f"{where}.content", "empty string"))
            ok = False
        if ok:
            out.append({"role": role, "content": content})
    return out if ok else None


def _check_order(
    messages: list[dict[str, str]],
    line: int,
    name: str,
    problems: list[Problem],
    end: Literal["assistant", "user"],
) -> None:
    """Optional system first, then user/assistant alternating, ending with ``end``."""
    roles = [m["role"] for m in messages]
    start = 1 if roles and roles[0] == "system" else 0
    turns = roles[start:]
    for i, role in enumerate(roles):
        if role == "system" and i != 0:
            problems.append(
                Problem(line, f"{name}[{i}].role", "a system message may only come first")
            )
            return
    if not turns:
        problems.append(Problem(line, name, "has no user turn"))
        return
    for i, role in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            problems.append(
                Problem(
                    line,
                    f"{name}[{i + start}].role",
                    f"expected {expected!r}, got {role!r}: turns must alternate user/assistant "
                    "starting with user",
                )
            )
            return
    if turns[-1] != end:
        problems.append(
            Problem(line, f"{name}[{len(roles) - 1}].role", f"must end with a {end} turn")
        )


def _prompt_field(value: Any, line: int, problems: list[Problem]) -> str | list[dict[str, str]]:
    if isinstance(value, str):
        if not value.strip():
            problems.append(Problem(line, "prompt", "empty string"))
        return value
    messages = _messages(value, line, "prompt", problems)
    if messages is not None:
        _check_order(messages, line, "prompt", problems, end="user")
        return messages
    return []


def _answer_field(value: Any, line: int, name: str, problems: list[Problem]) -> str:
    if isinstance(value, str):
        if not value.strip():
            problems.append(Problem(line, name, "empty string"))
        return value
    if isinstance(value, list):
        messages = _messages(value, line, name, problems)
        if messages is None:
            return ""
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            problems.append(
                Problem(line, name, "as a list it must hold exactly one assistant message")
            )
            return ""
        return messages[0]["content"]
    problems.append(
        Problem(line, name, f"must be a string or [assistant message], got {_kind(value)}")
    )
    return ""


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


# --------------------------------------------------------------------------- tokenisation


def as_chat_prompt(prompt: str | list[dict[str, str]]) -> list[dict[str, str]]:
    """A DPO/eval prompt as chat messages: a bare string becomes one user turn."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def _render_chat(
    tokenizer: Any, messages: list[dict[str, str]], first_trained: int = 0
) -> tuple[str, list[tuple[int, int]]]:
    """Render ``messages`` with the chat template; return the text and the character spans
    of assistant turns at index >= ``first_trained`` (each turn's end-of-turn included, so
    the model learns to stop)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant" or i < first_trained:
            continue
        before = tokenizer.apply_chat_template(
            messages[:i], tokenize=False, add_generation_prompt=True
        )
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        # Masks come from rendered prefixes: a template that renders a conversation's
        # beginning differently from the whole would silently mis-mask, so refuse it.
        if not (text.startswith(before) and text.startswith(upto) and len(upto) > len(before)):
            raise ValueError(
                "the chat template renders a conversation's prefix differently from the whole "
                "conversation, so assistant tokens cannot be located; use a template whose "
                "rendering of messages[:i] (with add_generation_prompt) is a prefix of the full one"
            )
        spans.append((len(before), len(upto)))
    return text, spans


def _tokenize_spans(
    tokenizer: Any,
    text: str,
    spans: list[tuple[int, int]],
    line: int,
    add_special_tokens: bool,
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
    return Tokenized(line=line, input_ids=ids, labels=labels, text=text, offsets=offsets)


def tokenize_sft(example: Example, tokenizer: Any) -> Tokenized:
    """Token ids and labels for SFT: loss on assistant turns / the completion only."""
    if example.format == "chat":
        assert example.messages is not None
        text, spans = _render_chat(tokenizer, example.messages)
        return _tokenize_spans(tokenizer, text, spans, example.line, add_special_tokens=False)
    if example.format == "prompt_completion":
        if isinstance(example.prompt, list):
            assert isinstance(example.completion, list)
            text, spans = _render_chat(
                tokenizer, example.prompt + example.completion, first_trained=len(example.prompt)
            )
            return _tokenize_spans(tokenizer, text, spans, example.line, add_special_tokens=False)
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
    text, spans = _render_chat(tokenizer, messages, first_trained=len(prompt))
    return _tokenize_spans(tokenizer, text, spans, example.line, add_special_tokens=False)


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
    if example.format == "chat":
        assert example.messages is not None
        text = tokenizer.apply_chat_template(
            example.messages[:-1], tokenize=False, add_generation_prompt=True
        )
        return text, True
    if example.format in ("preference", "unpaired") or isinstance(example.prompt, list):
        assert example.prompt is not None
        text = tokenizer.apply_chat_template(
            as_chat_prompt(example.prompt), tokenize=False, add_generation_prompt=True
        )
        return text, True
    return str(example.prompt), False


def tokenize_example(example: Example, tokenizer: Any) -> tuple[Tokenized, ...]:
    """The sequences training sees for one example, masked as in training: an SFT example,
    or both answers of a preference pair (DPO's loss runs over chosen and rejected)."""
    if example.format == "preference":
        return tokenize_preference(example, tokenizer)
    if example.format == "unpaired":
        return (_tokenize_answer(example, str(example.completion), tokenizer),)
    return (tokenize_sft(example, tokenizer),)


# --------------------------------------------------------------------------- lengths


def check_lengths(data: LoadedData, tokenizer: Any, max_length: int) -> LengthReport:
    """Count tokens per example with the real template; truncation is reported, and an
    example whose loss tokens would all be cut off is an error (it would train nothing)."""
    problems: list[Problem] = []
    lengths: list[int] = []
    truncated: list[int] = []
    for example in data.examples:
        try:
            seqs = tokenize_example(example, tokenizer)
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
    data_path: str | Path, tokenizer: Any, max_length: int, task: Task = "sft"
) -> dict[str, Any]:
    """Validate the data and render its first example with the loss mask marked.

    Returns a dict with counts, the length report and ``rendered`` (text). Raises DataError.
    """
    data = load_jsonl(data_path, task)
    report = check_lengths(data, tokenizer, max_length)
    first = data.examples[0]
    if first.format == "preference":
        chosen, rejected = tokenize_preference(first, tokenizer)
        rendered = (
            f"--- chosen (line {first.line}) ---\n{render_loss_mask(chosen, max_length)}\n"
            f"--- rejected (line {first.line}) ---\n{render_loss_mask(rejected, max_length)}"
        )
        n_tokens, n_loss = len(chosen.input_ids), chosen.n_loss_tokens
    else:
        (seq,) = tokenize_example(first, tokenizer)
        rendered = render_loss_mask(seq, max_length)
        if first.format == "unpaired":
            rendered = f"--- label {str(first.label).lower()} ---\n{rendered}"
        n_tokens, n_loss = len(seq.input_ids), seq.n_loss_tokens
    return {
        "path": str(data.path),
        "sha256": data.sha256,
        "counts": data.counts(),
        "lengths": asdict(report),
        "first_line": first.line,
        "first_tokens": n_tokens,
        "first_loss_tokens": n_loss,
        "rendered": rendered,
        "legend": f"text between {LOSS_OPEN} and {LOSS_CLOSE} carries loss; the rest is context",
    }
