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
- preference (DPO): ``{"prompt": str | messages, "chosen": str | [msg], "rejected": ...}``.

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
from typing import Any, Literal

from trainer import chat

logger = logging.getLogger(__name__)

Format = Literal["chat", "prompt_completion", "sharegpt", "alpaca", "preference"]
Task = Literal["sft", "dpo"]
LossTurns = Literal["all", "last"]
LOSS_TURNS = ("all", "last")

ROLES = ("system", "user", "assistant", "tool")
ROLE_ALIASES = {"developer": "system", "function": "tool"}
# ShareGPT speakers as the common tools write them (FastChat, Axolotl, LLaMA-Factory).
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "function_call": "assistant",  # LLaMA-Factory: the value is the call as JSON
    "observation": "tool",  # LLaMA-Factory: the tool's result
    "tool": "tool",
}
# Loss spans are drawn between these markers in the dry-run text.
LOSS_OPEN = "[["
LOSS_CLOSE = "]]"
TRUNCATION_MARK = "<<TRUNCATED HERE: the rest is cut by max_length>>"
MAX_PROBLEMS_IN_MESSAGE = 20
DRY_RUN_EXAMPLES = 3

Message = dict[str, Any]


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
    """One validated line, normalised: conversations as message lists, plain text as strings.

    ``messages`` hold ``role`` and ``content`` (None for an assistant turn that only calls
    tools), plus ``tool_calls`` (OpenAI's shape, ``arguments`` parsed to an object) or
    ``tool_call_id`` where the data had them. ``weights`` is parallel to ``messages``: 0 or 1
    as the data gave it for an assistant turn, else None (the default: trained)."""

    line: int
    format: Format
    messages: list[Message] | None = None  # chat, ShareGPT, Alpaca
    prompt: str | list[Message] | None = None  # prompt/completion and preference
    completion: str | list[Message] | None = None
    chosen: str | None = None  # preference: the assistant's preferred answer
    rejected: str | None = None
    tools: list[dict[str, Any]] | None = None
    weights: list[int | None] | None = None

    @property
    def conversation(self) -> list[Message] | None:
        """The whole conversation for formats that are one (chat, ShareGPT, Alpaca, and
        prompt/completion given as message lists); None for plain text and preferences."""
        if self.messages is not None:
            return self.messages
        if isinstance(self.prompt, list) and isinstance(self.completion, list):
            return self.prompt + self.completion
        return None

    def trained_turns(self, loss_turns: LossTurns = "all") -> list[bool]:
        """Per message of ``conversation``: whether it carries loss."""
        conv = self.conversation
        assert conv is not None
        first = len(self.prompt) if self.messages is None and isinstance(self.prompt, list) else 0
        weights = self.weights or [None] * len(conv)
        flags = [
            i >= first and m["role"] == "assistant" and w != 0
            for i, (m, w) in enumerate(zip(conv, weights, strict=True))
        ]
        if loss_turns == "last":
            last = max(i for i, m in enumerate(conv) if m["role"] == "assistant")
            flags = [f and i == last for i, f in enumerate(flags)]
        return flags

    def reference_answer(self, tokenizer: Any = None) -> str:
        """The answer a model should give to this example's prompt (for eval): the last
        assistant turn. A turn with tool calls is rendered as the template writes it (needs
        ``tokenizer``; without one, in the fallback format)."""
        conv = self.conversation
        if conv is not None:
            last = conv[-1]
            if last.get("tool_calls"):
                if tokenizer is not None:
                    return chat.turn_text(tokenizer, conv, self.tools)
                parts = [last["content"]] if last.get("content") else []
                return "\n".join(parts + [chat.tool_call_text(c) for c in last["tool_calls"]])
            return str(last.get("content") or "")
        if self.format == "preference":
            assert self.chosen is not None
            return self.chosen
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

    ``task`` "sft" accepts every format but preference pairs, "dpo" preference pairs only.
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
    if "chosen" in obj or "rejected" in obj:
        if task == "sft":
            problems.append(
                Problem(line, "chosen", "preference pairs are DPO data; use `train dpo` for them")
            )
            return None
        return _preference(obj, line, problems)
    if task == "dpo":
        problems.append(
            Problem(line, "chosen", "missing: DPO needs {prompt, chosen, rejected} on every line")
        )
        return None
    if "messages" in obj:
        return _chat(obj, line, problems)
    if "conversations" in obj:
        return _sharegpt(obj, line, problems)
    if "instruction" in obj or "output" in obj:
        return _alpaca(obj, line, problems)
    if "prompt" in obj or "completion" in obj:
        return _prompt_completion(obj, line, problems)
    keys = ", ".join(sorted(obj)) or "none"
    problems.append(
        Problem(
            line,
            "",
            f"unknown format (fields: {keys}); expected 'messages' (chat, OpenAI fine-tuning), "
            "'prompt'+'completion', 'conversations' (ShareGPT), 'instruction'+'output' "
            "(Alpaca), or 'prompt'+'chosen'+'rejected' (DPO)",
        )
    )
    return None


# -- chat / OpenAI fine-tuning format


def _chat(obj: dict[str, Any], line: int, problems: list[Problem]) -> Example | None:
    before = len(problems)
    tools = _tools(obj, line, problems)
    parsed = _messages(obj["messages"], line, "messages", problems, tools_ok=True)
    if parsed is None or len(problems) > before:
        return None
    messages, weights = parsed
    _check_conversation(messages, line, "messages", problems, tools)
    _check_weights(messages, weights, line, "messages", problems)
    if len(problems) > before:
        return None
    return Example(
        line,
        "chat",
        messages=messages,
        tools=tools,
        weights=weights if any(w is not None for w in weights) else None,
    )


def _tools(obj: dict[str, Any], line: int, problems: list[Problem]) -> list[dict] | None:
    """The example's ``tools`` (or legacy ``functions``), as OpenAI's function tools."""
    if "tools" in obj and obj["tools"] is not None:
        value, name = obj["tools"], "tools"
    elif "functions" in obj and obj["functions"] is not None:
        value, name = [{"type": "function", "function": f} for f in obj["functions"]], "functions"
        if not isinstance(obj["functions"], list):
            value = obj["functions"]
    else:
        return None
    if isinstance(value, str):  # ShareGPT tools are often a JSON string
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            problems.append(Problem(line, name, "a string that is not JSON"))
            return None
    if not isinstance(value, list):
        problems.append(Problem(line, name, f"must be a list of tools, got {_kind(value)}"))
        return None
    tools = []
    for i, tool in enumerate(value):
        where = f"{name}[{i}]"
        if isinstance(tool, dict) and "function" not in tool and "name" in tool:
            tool = {"type": "function", "function": tool}  # a bare function schema
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            problems.append(
                Problem(line, where, 'expected {"type": "function", "function": {"name", ...}}')
            )
            continue
        if tool.get("type", "function") != "function":
            problems.append(Problem(line, f"{where}.type", "only function tools are supported"))
            continue
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            problems.append(Problem(line, f"{where}.function.parameters", "must be an object"))
            continue
        tools.append({"type": "function", "function": fn})
    return tools


def _messages(
    value: Any, line: int, name: str, problems: list[Problem], *, tools_ok: bool = False
) -> tuple[list[Message], list[int | None]] | None:
    """Validated, normalised messages and their weights; None when any is bad."""
    if not isinstance(value, list):
        problems.append(Problem(line, name, f"must be a list of messages, got {_kind(value)}"))
        return None
    if not value:
        problems.append(Problem(line, name, "empty list of messages"))
        return None
    out: list[Message] = []
    weights: list[int | None] = []
    before = len(problems)
    for i, msg in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(msg, dict):
            problems.append(Problem(line, where, f"must be an object, got {_kind(msg)}"))
            continue
        parsed = _message(msg, line, where, problems, tools_ok)
        if parsed is not None:
            out.append(parsed)
            weights.append(msg.get("weight"))
    if len(problems) > before:
        return None
    return out, weights


def _message(
    msg: dict[str, Any], line: int, where: str, problems: list[Problem], tools_ok: bool
) -> Message | None:
    before = len(problems)
    role = msg.get("role")
    roles = ROLES if tools_ok else ("system", "user", "assistant")
    if role is None:
        problems.append(Problem(line, f"{where}.role", "missing"))
        return None
    if tools_ok:
        role = ROLE_ALIASES.get(role, role)
    elif role == "developer":
        role = "system"
    if role not in roles:
        problems.append(
            Problem(line, f"{where}.role", f"{role!r} is not one of {', '.join(roles)}")
        )
        return None
    tool_calls = None
    if tools_ok and role == "assistant":
        tool_calls = _tool_calls(msg, line, where, problems)
    elif "tool_calls" in msg and msg["tool_calls"] is not None:
        why = "only an assistant turn calls tools" if tools_ok else "tool calls are chat data"
        problems.append(Problem(line, f"{where}.tool_calls", why))
    # a turn that calls tools (even with a bad call, reported above) may have no text
    calls_tools = tools_ok and any(msg.get(k) is not None for k in ("tool_calls", "function_call"))
    content = _content(msg, line, where, problems, optional=calls_tools, role=role)
    weight = msg.get("weight")
    if weight is not None:
        if role != "assistant":
            problems.append(
                Problem(line, f"{where}.weight", "only assistant messages have a weight")
            )
        elif isinstance(weight, bool) or weight not in (0, 1):
            problems.append(Problem(line, f"{where}.weight", f"{weight!r}: must be 0 or 1"))
    if len(problems) > before:
        return None
    out: Message = {"role": role, "content": content}
    if tool_calls:
        out["tool_calls"] = tool_calls
    if role == "tool":
        call_id = msg.get("tool_call_id")
        if call_id is not None and not isinstance(call_id, str):
            problems.append(Problem(line, f"{where}.tool_call_id", "must be a string"))
            return None
        out["tool_call_id"] = call_id
        if isinstance(msg.get("name"), str):
            out["name"] = msg["name"]  # legacy `function` messages name their function
    return out


def _content(
    msg: dict[str, Any],
    line: int,
    where: str,
    problems: list[Problem],
    *,
    optional: bool,
    role: str,
) -> str | None:
    content = msg.get("content")
    if isinstance(content, list):  # OpenAI's content parts: text only
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                problems.append(
                    Problem(line, f"{where}.content[{j}]", "only text parts can be trained on")
                )
                return None
            if not isinstance(part.get("text"), str):
                problems.append(Problem(line, f"{where}.content[{j}].text", "must be a string"))
                return None
            texts.append(part["text"])
        content = "".join(texts)
    if role == "tool" and isinstance(content, dict | list):
        content = json.dumps(content, ensure_ascii=False)  # a structured tool result
    if content is None:
        if optional:
            return None
        problems.append(Problem(line, f"{where}.content", "missing"))
        return None
    if not isinstance(content, str):
        problems.append(
            Problem(line, f"{where}.content", f"must be a string, got {_kind(content)}")
        )
        return None
    if not content.strip() and not optional and role != "tool":
        problems.append(Problem(line, f"{where}.content", "empty string"))
        return None
    return content


def _tool_calls(
    msg: dict[str, Any], line: int, where: str, problems: list[Problem]
) -> list[dict[str, Any]] | None:
    """An assistant's ``tool_calls`` (or legacy ``function_call``), arguments parsed."""
    calls = msg.get("tool_calls")
    name = "tool_calls"
    if calls is None and msg.get("function_call") is not None:
        calls, name = [{"type": "function", "function": msg["function_call"]}], "function_call"
    if calls is None:
        return None
    if not isinstance(calls, list) or not calls:
        problems.append(Problem(line, f"{where}.{name}", "must be a non-empty list of calls"))
        return None
    out = []
    for k, call in enumerate(calls):
        at = f"{where}.{name}[{k}]" if name == "tool_calls" else f"{where}.{name}"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            problems.append(
                Problem(
                    line,
                    at,
                    'expected {"id", "type": "function", "function": {"name", "arguments"}}',
                )
            )
            continue
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as exc:
                problems.append(
                    Problem(line, f"{at}.function.arguments", f"not valid JSON: {exc.msg}")
                )
                continue
        if not isinstance(args, dict):
            problems.append(
                Problem(line, f"{at}.function.arguments", "must be a JSON object (or its text)")
            )
            continue
        call_id = call.get("id")
        if call_id is not None and not isinstance(call_id, str):
            problems.append(Problem(line, f"{at}.id", "must be a string"))
            continue
        out.append(
            {
                "id": call_id,
                "type": "function",
                "function": {"name": fn["name"], "arguments": args},
            }
        )
    return out if len(out) == len(calls) else None


def _check_conversation(
    messages: list[Message],
    line: int,
    name: str,
    problems: list[Problem],
    tools: list[dict] | None,
    end: Literal["assistant", "user"] = "assistant",
) -> None:
    """Optional system first; then user and assistant turns alternating, starting with user;
    an assistant turn that calls tools is followed by one ``tool`` message per call (in any
    order) and then the assistant again. Ends with ``end``. Tool calls without ids get
    ``call_<n>``; a ``tool`` message without ``tool_call_id`` answers the next open call."""
    for i, msg in enumerate(messages):
        if msg["role"] == "system" and i != 0:
            problems.append(
                Problem(line, f"{name}[{i}].role", "a system message may only come first")
            )
            return
    start = 1 if messages[0]["role"] == "system" else 0
    if len(messages) == start:
        problems.append(Problem(line, name, "has no user turn"))
        return
    known = {t["function"]["name"] for t in tools} if tools is not None else None
    expected = "user"
    open_calls: list[str] = []
    n_calls = 0
    for i in range(start, len(messages)):
        msg, role, at = messages[i], messages[i]["role"], f"{name}[{i}]"
        if role == "tool":
            if not open_calls:
                problems.append(
                    Problem(
                        line,
                        f"{at}.role",
                        "a tool message must answer a tool call of the assistant turn before it",
                    )
                )
                return
            call_id = msg.get("tool_call_id") or open_calls[0]
            if call_id not in open_calls:
                problems.append(
                    Problem(
                        line,
                        f"{at}.tool_call_id",
                        f"{call_id!r} answers no open tool call (open: {', '.join(open_calls)})",
                    )
                )
                return
            msg["tool_call_id"] = call_id
            open_calls.remove(call_id)
            expected = "tool" if open_calls else "assistant"
            continue
        if open_calls:
            problems.append(
                Problem(
                    line,
                    f"{at}.role",
                    f"expected a tool message answering {', '.join(open_calls)}, got {role!r}",
                )
            )
            return
        if role != expected:
            problems.append(
                Problem(
                    line,
                    f"{at}.role",
                    f"expected {expected!r}, got {role!r}: turns must alternate user/assistant "
                    "starting with user",
                )
            )
            return
        if role == "assistant" and msg.get("tool_calls"):
            for call in msg["tool_calls"]:
                if call["id"] is None:
                    call["id"] = f"call_{n_calls}"
                n_calls += 1
                fn_name = call["function"]["name"]
                if known is not None and fn_name not in known:
                    problems.append(
                        Problem(
                            line,
                            f"{at}.tool_calls",
                            f"calls {fn_name!r}, which is not "
                            f"among the example's tools ({', '.join(sorted(known))})",
                        )
                    )
                    return
                open_calls.append(call["id"])
            expected = "tool"
            continue
        expected = "assistant" if role == "user" else "user"
    last = messages[-1]["role"]
    if last != end:
        if last == "tool" or open_calls:
            problems.append(
                Problem(
                    line,
                    f"{name}[{len(messages) - 1}]",
                    f"must end with a {end} turn (the answer after the tool results)",
                )
            )
        else:
            problems.append(
                Problem(line, f"{name}[{len(messages) - 1}].role", f"must end with a {end} turn")
            )


def _check_weights(
    messages: list[Message],
    weights: list[int | None],
    line: int,
    name: str,
    problems: list[Problem],
) -> None:
    assistant = [w for m, w in zip(messages, weights, strict=True) if m["role"] == "assistant"]
    if assistant and all(w == 0 for w in assistant):
        problems.append(
            Problem(line, name, "every assistant message has weight 0: nothing to learn")
        )


# -- ShareGPT


def _sharegpt(obj: dict[str, Any], line: int, problems: list[Problem]) -> Example | None:
    before = len(problems)
    turns = obj["conversations"]
    if not isinstance(turns, list) or not turns:
        problems.append(Problem(line, "conversations", "must be a non-empty list of turns"))
        return None
    messages: list[dict[str, Any]] = []
    system = obj.get("system")
    if system is not None:
        if not isinstance(system, str):
            problems.append(Problem(line, "system", "must be a string"))
        elif system.strip():
            messages.append({"role": "system", "content": system})
    offset = len(messages)  # a top-level system prompt comes before the turns
    for i, turn in enumerate(turns):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            problems.append(Problem(line, where, f"must be an object, got {_kind(turn)}"))
            continue
        speaker, value = turn.get("from"), turn.get("value")
        role = SHAREGPT_ROLES.get(str(speaker).lower()) if speaker is not None else None
        if role is None:
            problems.append(
                Problem(
                    line,
                    f"{where}.from",
                    f"{speaker!r} is not a known speaker (use human/gpt/system, or "
                    "function_call/observation for tools)"
                    if speaker is not None
                    else "missing",
                )
            )
            continue
        if not isinstance(value, str):
            problems.append(
                Problem(line, f"{where}.value", f"must be a string, got {_kind(value)}")
            )
            continue
        msg: dict[str, Any] = {"role": role, "content": value}
        if speaker == "function_call":
            try:
                call = json.loads(value)
            except json.JSONDecodeError as exc:
                problems.append(Problem(line, f"{where}.value", f"not a JSON call: {exc.msg}"))
                continue
            calls = call if isinstance(call, list) else [call]
            msg = {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"type": "function", "function": c} if isinstance(c, dict) else c for c in calls
                ],
            }
        if "weight" in turn:
            msg["weight"] = turn["weight"]
        messages.append(msg)
    if len(problems) > before:
        return None
    # the rest is the chat format's validation, field names translated back
    tools = _tools(obj, line, problems)
    sub: list[Problem] = []
    parsed = _messages(messages, line, "conversations", sub, tools_ok=True)
    if parsed is not None:
        msgs, weights = parsed
        _check_conversation(msgs, line, "conversations", sub, tools)
        _check_weights(msgs, weights, line, "conversations", sub)
    problems.extend(_renumber(p, offset) for p in sub)
    if len(problems) > before or parsed is None:
        return None
    return Example(
        line,
        "sharegpt",
        messages=msgs,
        tools=tools,
        weights=weights if any(w is not None for w in weights) else None,
    )


def _renumber(problem: Problem, offset: int) -> Problem:
    """A problem found on the converted messages, pointed back at the ShareGPT turn."""
    field_name = problem.field
    if field_name.startswith("conversations["):
        index = int(field_name[len("conversations[") : field_name.index("]")])
        rest = field_name[field_name.index("]") + 1 :]
        rest = {".role": ".from", ".content": ".value"}.get(rest, rest)
        field_name = "system" if index < offset else f"conversations[{index - offset}]{rest}"
    return Problem(problem.line, field_name, problem.message)


# -- Alpaca


def _alpaca(obj: dict[str, Any], line: int, problems: list[Problem]) -> Example | None:
    before = len(problems)
    for name in ("instruction", "output"):
        value = obj.get(name)
        if value is None:
            problems.append(Problem(line, name, "missing (Alpaca needs instruction and output)"))
        elif not isinstance(value, str):
            problems.append(Problem(line, name, f"must be a string, got {_kind(value)}"))
        elif not value.strip():
            problems.append(Problem(line, name, "empty string"))
    for name in ("input", "system"):
        if obj.get(name) is not None and not isinstance(obj[name], str):
            problems.append(Problem(line, name, f"must be a string, got {_kind(obj[name])}"))
    history = obj.get("history") or []
    if not isinstance(history, list) or not all(
        isinstance(h, list | tuple)
        and len(h) == 2
        and all(isinstance(x, str) and x.strip() for x in h)
        for h in history
    ):
        problems.append(
            Problem(line, "history", "must be a list of [instruction, output] string pairs")
        )
    if len(problems) > before:
        return None
    messages: list[Message] = []
    if (obj.get("system") or "").strip():
        messages.append({"role": "system", "content": obj["system"]})
    for q, a in history:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    user = obj["instruction"]
    if (obj.get("input") or "").strip():
        user = f"{user}\n\n{obj['input']}"
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": obj["output"]}]
    return Example(line, "alpaca", messages=messages)


# -- prompt/completion


def _prompt_completion(obj: dict[str, Any], line: int, problems: list[Problem]) -> Example | None:
    before = len(problems)
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
        tools = _tools(obj, line, problems)
        p = _messages(prompt, line, "prompt", problems, tools_ok=True)
        c = _messages(completion, line, "completion", problems, tools_ok=True)
        if p is None or c is None or len(problems) > before:
            return None
        _check_conversation(p[0] + c[0], line, "prompt+completion", problems, tools)
        if c[0] and c[0][0]["role"] != "assistant":
            problems.append(Problem(line, "completion", "must start with an assistant turn"))
        if len(problems) > before:
            return None
        weights = p[1] + c[1]
        return Example(
            line,
            "prompt_completion",
            prompt=p[0],
            completion=c[0],
            tools=tools,
            weights=weights if any(w is not None for w in weights) else None,
        )
    problems.append(
        Problem(
            line,
            "prompt",
            "prompt and completion must both be strings or both be message lists, got "
            f"{type(prompt).__name__} and {type(completion).__name__}",
        )
    )
    return None


# -- preference pairs


def _preference(obj: dict[str, Any], line: int, problems: list[Problem]) -> Example | None:
    before = len(problems)
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
        problems.append(Problem(line, "rejected", "identical to chosen: the pair teaches nothing"))
        return None
    return Example(line, "preference", prompt=prompt, chosen=chosen, rejected=rejected)


def _prompt_field(value: Any, line: int, problems: list[Problem]) -> str | list[Message]:
    if isinstance(value, str):
        if not value.strip():
            problems.append(Problem(line, "prompt", "empty string"))
        return value
    parsed = _messages(value, line, "prompt", problems)
    if parsed is not None:
        _check_conversation(parsed[0], line, "prompt", problems, None, end="user")
        return parsed[0]
    return []


def _answer_field(value: Any, line: int, name: str, problems: list[Problem]) -> str:
    if isinstance(value, str):
        if not value.strip():
            problems.append(Problem(line, name, "empty string"))
        return value
    if isinstance(value, list):
        parsed = _messages(value, line, name, problems)
        if parsed is None:
            return ""
        messages = parsed[0]
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            problems.append(
                Problem(line, name, "as a list it must hold exactly one assistant message")
            )
            return ""
        return str(messages[0]["content"])
    problems.append(
        Problem(line, name, f"must be a string or [assistant message], got {_kind(value)}")
    )
    return ""


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


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


def tokenize_preference(example: Example, tokenizer: Any) -> tuple[Tokenized, Tokenized]:
    """Chosen and rejected sequences of a preference pair, each masked to its answer."""
    assert example.prompt is not None and example.chosen is not None
    prompt = as_chat_prompt(example.prompt)
    out = []
    for answer in (example.chosen, example.rejected):
        messages = prompt + [{"role": "assistant", "content": answer or ""}]
        flags = [False] * len(prompt) + [True]
        try:
            rendered = chat.render(tokenizer, messages, flags)
        except chat.TemplateError as exc:
            raise ValueError(str(exc)) from exc
        out.append(
            _tokenize_spans(
                tokenizer, rendered.text, rendered.spans, example.line, add_special_tokens=False
            )
        )
    return out[0], out[1]


def prompt_for_generation(example: Example, tokenizer: Any) -> tuple[str, bool]:
    """The text to feed the model to answer this example, and whether it already holds
    the special tokens (rendered by the chat template) or needs them added."""
    conversation = example.conversation
    if conversation is not None:
        return chat.render_prompt(tokenizer, conversation[:-1], example.tools), True
    if example.format == "preference":
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
            seq = tokenize_sft(example, tokenizer, loss_turns)
            fallback = fallback or seq.tool_fallback
            n_tokens, n_loss = len(seq.input_ids), seq.n_loss_tokens
            text = (
                f"--- line {example.line}: {n_tokens} tokens, {n_loss} carry loss ---\n"
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
