"""Tool-call parsers: a model's text -> OpenAI tool calls, one module per format (as vLLM's
tool_parsers/). The format must match the chat template's: the project's Gemma template
(trainer/base_model.py) writes calls in the `hermes` format."""

from __future__ import annotations

from server.serving.tool_parsers.hermes import HermesParser, ParsedCall

PARSERS = {"hermes": HermesParser}

__all__ = ["PARSERS", "HermesParser", "ParsedCall"]
