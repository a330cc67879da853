"""What a line of training data may be, and how each format a user brings becomes one
normalised ``Example`` (see ``trainer.data`` for the formats and the loss rules).

``parse_line`` reads one JSON object; every problem it finds is appended to ``problems``
with its line number and field, so a user can fix the whole file in one go. Nothing here
needs a tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from trainer import chat

Format = Literal["chat", "prompt_completion", "sharegpt", "alpaca", "preference", "unpaired"]
# sft: every format but pairs and ratings; dpo: preference pairs; kto: rated answers or pairs
Task = Literal["sft", "dpo", "kto"]

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
MAX_PROBLEMS_IN_MESSAGE = 20
# which assistant turns carry loss: "all" or "last" (checked by the job config)
LossTurns = str
LOSS_TURNS = ("all", "last")

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
    label: bool | None = None  # unpaired (KTO): whether ``completion`` is a desirable answer

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


# --------------------------------------------------------------------------- formats


def parse_line(
    obj: dict[str, Any], line: int, task: Task | None, problems: list[Problem]
) -> Example | None:
    if "label" in obj:
        return _unpaired(obj, line, task, problems)
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
    if task == "kto":
        problems.append(
            Problem(
                line,
                "label",
                "missing: KTO needs {prompt, completion, label} or {prompt, chosen, rejected} "
                "on every line",
            )
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


# -- rated answers (KTO's unpaired preference format)


def _unpaired(
    obj: dict[str, Any], line: int, task: Task | None, problems: list[Problem]
) -> Example | None:
    """{prompt, completion, label}: one answer rated desirable (true) or not, as
    ``POST /ab/feedback`` collects thumbs up/down."""
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
