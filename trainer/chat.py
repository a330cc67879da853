"""Conversations rendered to text with the tokenizer's chat template, tool calls included,
and the character spans of the turns that carry loss.

The training masks are computed from rendered prefixes: the text of ``messages[:i]`` with
the generation prompt is where assistant turn ``i`` starts, the text of ``messages[:i+1]``
is where it ends (its end-of-turn marker included, so the model learns to stop). A template
that renders a conversation's beginning differently from the whole is refused rather than
mis-masked.

Tools. A conversation with tools (a ``tools`` list, assistant ``tool_calls``, ``tool``
messages) is rendered by the chat template with ``tools=`` when the template has a tool
format (``template_renders_tools``), as the bundled Gemma template does. When it has none
(SmolLM2's ChatML template, most templates of small models), the conversation is rewritten
into plain turns the template can render, with the bundled template's conventions, which
are the Hermes format that the server's ``hermes`` parser and forced-call grammar use:

- the tools are described in the system message (one is added when there is none): how to
  call, then one JSON schema per line;
- an assistant tool call becomes ``<tool_call>{"name":...,"arguments":{...}}</tool_call>``
  (compact JSON) in the assistant's text, after its content if any, one block per call;
- each ``tool`` message becomes a user turn ``<tool_response>\n...\n</tool_response>``.

Training, the trainer's eval and the server (``server/engine/hf.py``) all render through
``render`` / ``render_prompt``, so an adapter sees its tools the same way in all three.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

Message = dict[str, Any]

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
TOOL_RESPONSE_OPEN = "<tool_response>"
TOOL_RESPONSE_CLOSE = "</tool_response>"
# the bundled Gemma template's words (trainer/base_model.py), for templates without tools
FALLBACK_TOOLS_HEADER = (
    f"You can call these functions. To call one, answer with "
    f'{TOOL_CALL_OPEN}{{"name": <function name>, "arguments": <arguments object>}}'
    f"{TOOL_CALL_CLOSE} (one per call).\n"
)

_PROBE_TOOL = "swapserve_probe_tool"
_PROBE_CALL = "swapserve_probe_call"
_PROBE_ARG = "swapserve_probe_arg"
_PROBE_RESULT = "swapserve_probe_result"
_tool_support: dict[str, bool] = {}


class TemplateError(ValueError):
    """The chat template cannot render this conversation in a way the masks can trust."""


@dataclass
class Rendered:
    """A conversation as text, and the character spans that carry loss."""

    text: str
    spans: list[tuple[int, int]]
    tool_fallback: bool = False  # tools were rewritten into plain turns (see module doc)


def uses_tools(messages: list[Message], tools: list[dict] | None) -> bool:
    return bool(tools) or any(m.get("tool_calls") or m["role"] == "tool" for m in messages)


def template_renders_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template renders ``tools``, assistant ``tool_calls`` and
    ``tool`` messages (probed once per template: the probe's names must all appear)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    key = hashlib.sha256(str(template).encode()).hexdigest()
    if key not in _tool_support:
        probe = [
            {"role": "user", "content": "probe"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_0",
                        "type": "function",
                        "function": {"name": _PROBE_CALL, "arguments": {_PROBE_ARG: 1}},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_0", "content": _PROBE_RESULT},
            {"role": "assistant", "content": "done"},
        ]
        tools = [{"type": "function", "function": {"name": _PROBE_TOOL, "parameters": {}}}]
        try:
            text = tokenizer.apply_chat_template(probe, tools=tools, tokenize=False)
        except Exception:  # noqa: BLE001 - any failure means "cannot render tools"
            text = ""
        _tool_support[key] = all(
            marker in text for marker in (_PROBE_TOOL, _PROBE_CALL, _PROBE_ARG, _PROBE_RESULT)
        )
    return _tool_support[key]


def tool_call_text(call: dict[str, Any]) -> str:
    """One tool call in the fallback format (the bundled template's, compact JSON)."""
    fn = call["function"]
    body = json.dumps(
        {"name": fn["name"], "arguments": fn["arguments"]},
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return f"{TOOL_CALL_OPEN}{body}{TOOL_CALL_CLOSE}"


def tools_system_text(tools: list[dict]) -> str:
    lines = [json.dumps(t.get("function", t), ensure_ascii=False) for t in tools]
    return FALLBACK_TOOLS_HEADER + "".join(line + "\n" for line in lines)


def fallback_messages(
    messages: list[Message], tools: list[dict] | None, trained: list[bool]
) -> tuple[list[Message], list[bool]]:
    """Rewrite a conversation with tools into plain system/user/assistant turns (module doc);
    ``trained`` flags follow their assistant turns."""
    out: list[Message] = []
    flags: list[bool] = []
    if tools:
        block = tools_system_text(tools).strip()
        if messages and messages[0]["role"] == "system":
            out.append({"role": "system", "content": f"{messages[0]['content']}\n\n{block}"})
            messages, trained = messages[1:], trained[1:]
        else:
            out.append({"role": "system", "content": block})
        flags.append(False)
    for msg, flag in zip(messages, trained, strict=True):
        role = msg["role"]
        if role == "tool":
            text = (
                f"{TOOL_RESPONSE_OPEN}\n{(msg.get('content') or '').strip()}\n{TOOL_RESPONSE_CLOSE}"
            )
            out.append({"role": "user", "content": text})
        elif role == "assistant" and msg.get("tool_calls"):
            text = (msg.get("content") or "").strip()
            text += "".join(tool_call_text(c) for c in msg["tool_calls"])
            out.append({"role": "assistant", "content": text})
        else:
            out.append({"role": role, "content": msg.get("content") or ""})
        flags.append(flag)
    return out, flags


def _apply(
    tokenizer: Any, messages: list[Message], tools: list[dict] | None, generation_prompt: bool
) -> str:
    kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": generation_prompt}
    if tools:
        kwargs["tools"] = tools
    return str(tokenizer.apply_chat_template(messages, **kwargs))


def prepare(
    tokenizer: Any, messages: list[Message], tools: list[dict] | None, trained: list[bool]
) -> tuple[list[Message], list[dict] | None, list[bool], bool]:
    """The messages, tools and flags to give the template; the last value says whether the
    tool fallback rewrote them."""
    if uses_tools(messages, tools) and not template_renders_tools(tokenizer):
        plain, flags = fallback_messages(messages, tools, trained)
        return plain, None, flags, True
    return messages, tools, trained, False


def render(
    tokenizer: Any,
    messages: list[Message],
    trained: list[bool],
    tools: list[dict] | None = None,
) -> Rendered:
    """The whole conversation as text, and the spans of the turns flagged in ``trained``."""
    msgs, tls, flags, fallback = prepare(tokenizer, messages, tools, trained)
    text = _apply(tokenizer, msgs, tls, False)
    spans = []
    for i, (msg, flag) in enumerate(zip(msgs, flags, strict=True)):
        if not flag:
            continue
        assert msg["role"] == "assistant"
        before = _apply(tokenizer, msgs[:i], tls, True)
        upto = _apply(tokenizer, msgs[: i + 1], tls, False)
        # Masks come from rendered prefixes: a template that renders a conversation's
        # beginning differently from the whole would silently mis-mask, so refuse it.
        if not (text.startswith(before) and text.startswith(upto) and len(upto) > len(before)):
            raise TemplateError(
                "the chat template renders a conversation's prefix differently from the whole "
                "conversation, so assistant tokens cannot be located; use a template whose "
                "rendering of messages[:i] (with add_generation_prompt) is a prefix of the full one"
            )
        spans.append((len(before), len(upto)))
    return Rendered(text, spans, fallback)


def render_prompt(tokenizer: Any, messages: list[Message], tools: list[dict] | None = None) -> str:
    """The conversation so far, ending with the generation prompt (the next turn is the
    assistant's), rendered as training renders it."""
    msgs, tls, _, _ = prepare(tokenizer, messages, tools, [False] * len(messages))
    return _apply(tokenizer, msgs, tls, True)


def turn_text(tokenizer: Any, messages: list[Message], tools: list[dict] | None = None) -> str:
    """The rendered text of the last message (an assistant turn) alone, as the model should
    write it, without the template's special tokens: the reference answer for eval."""
    flags = [False] * (len(messages) - 1) + [True]
    rendered = render(tokenizer, messages, flags, tools)
    start, end = rendered.spans[-1]
    ids = tokenizer(rendered.text[start:end], add_special_tokens=False)["input_ids"]
    return str(tokenizer.decode(ids, skip_special_tokens=True)).strip()
