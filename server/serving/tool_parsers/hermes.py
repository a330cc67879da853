"""The `hermes` tool-call format: each call is a JSON object between tags,

    <tool_call>{"name":"get_weather","arguments":{"city":"Paris"}}</tool_call>

the format of Hermes, Qwen 2.5 and the project's Gemma template. Text outside the tags is
the message's content."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

OPEN = "<tool_call>"
CLOSE = "</tool_call>"
_CALL = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.DOTALL)


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text


class HermesParser:
    open_tag = OPEN
    close_tag = CLOSE

    @staticmethod
    def parse(text: str) -> tuple[str | None, list[ParsedCall]]:
        """(content outside the calls, or None when empty; the calls that parse)."""
        calls: list[ParsedCall] = []
        for match in _CALL.finditer(text):
            try:
                obj: Any = json.loads(match.group(1))
            except json.JSONDecodeError:
                continue
            if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
                continue
            args = obj.get("arguments", obj.get("parameters", {}))
            calls.append(ParsedCall(obj["name"], json.dumps(args, ensure_ascii=False)))
        rest = _CALL.sub("", text) if calls else text
        rest = rest.strip()
        return (rest or None), calls
