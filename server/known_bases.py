"""Judging the base model an adapter names (``base_model_name_or_path``).

The adapter's tensors decide first: module names and shapes either fit the served base or
they do not (the kinds' validation). The name only adds a refusal when it is a model known
to differ: a well-known checkpoint whose architecture is not the served base's, or, when
the served base is itself a known checkpoint, another known checkpoint (an instruction-
tuned sibling of the same shape has other weights). A name nobody can judge (a local folder
such as ``/data/models/adapters``, an unknown hub id) is reported, never refused: refusing
on a guess would turn away adapters trained on a local copy of the very same base.

The table lists checkpoints by the name their own authors publish, with the few facts that
tell architectures apart (hidden size, layers). Re-uploads and quantized copies (Unsloth's
``-bnb-4bit``, ``-GGUF``, ...) are the same model and normalise to the same name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath, PureWindowsPath


@dataclass(frozen=True)
class Arch:
    family: str
    hidden_size: int
    num_layers: int


def _table() -> dict[str, Arch]:
    known: dict[str, Arch] = {}

    def add(arch: Arch, *names: str) -> None:
        for name in names:
            known[name] = arch

    # (names of the pre-trained model, names of its instruction-tuned sibling)
    for size, hidden, layers, pt, it in (
        ("270m", 640, 18, ["gemma-3-270m"], ["gemma-3-270m-it"]),
        ("1b", 1152, 26, ["gemma-3-1b", "gemma-3-1b-pt"], ["gemma-3-1b-it"]),
        ("4b", 2560, 34, ["gemma-3-4b", "gemma-3-4b-pt"], ["gemma-3-4b-it"]),
        ("12b", 3840, 48, ["gemma-3-12b", "gemma-3-12b-pt"], ["gemma-3-12b-it"]),
        ("27b", 5376, 62, ["gemma-3-27b", "gemma-3-27b-pt"], ["gemma-3-27b-it"]),
    ):
        del size
        add(Arch("gemma3", hidden, layers), *pt, *it)
    add(Arch("gemma2", 2304, 26), "gemma-2-2b", "gemma-2-2b-it")
    add(Arch("gemma2", 3584, 42), "gemma-2-9b", "gemma-2-9b-it")
    add(Arch("gemma2", 4608, 46), "gemma-2-27b", "gemma-2-27b-it")
    add(Arch("gemma", 2048, 18), "gemma-2b", "gemma-2b-it")
    add(Arch("gemma", 3072, 28), "gemma-7b", "gemma-7b-it")
    add(Arch("llama", 4096, 32), "llama-2-7b", "llama-2-7b-chat")
    add(Arch("llama", 5120, 40), "llama-2-13b", "llama-2-13b-chat")
    add(
        Arch("llama", 4096, 32),
        "meta-llama-3-8b",
        "meta-llama-3-8b-instruct",
        "llama-3.1-8b",
        "llama-3.1-8b-instruct",
        "meta-llama-3.1-8b",
        "meta-llama-3.1-8b-instruct",
    )
    add(
        Arch("llama", 8192, 80), "llama-3.1-70b", "llama-3.1-70b-instruct", "llama-3.3-70b-instruct"
    )
    add(Arch("llama", 2048, 16), "llama-3.2-1b", "llama-3.2-1b-instruct")
    add(Arch("llama", 3072, 28), "llama-3.2-3b", "llama-3.2-3b-instruct")
    add(Arch("llama", 2048, 22), "tinyllama-1.1b-chat-v1.0", "tinyllama_v1.1")
    add(Arch("mistral", 4096, 32), "mistral-7b-v0.1", "mistral-7b-instruct-v0.1",
        "mistral-7b-v0.3", "mistral-7b-instruct-v0.2", "mistral-7b-instruct-v0.3")  # fmt: skip
    add(Arch("qwen2", 896, 24), "qwen2.5-0.5b", "qwen2.5-0.5b-instruct")
    add(Arch("qwen2", 1536, 28), "qwen2.5-1.5b", "qwen2.5-1.5b-instruct")
    add(Arch("qwen2", 2048, 36), "qwen2.5-3b", "qwen2.5-3b-instruct")
    add(Arch("qwen2", 3584, 28), "qwen2.5-7b", "qwen2.5-7b-instruct")
    add(Arch("qwen3", 1024, 28), "qwen3-0.6b", "qwen3-0.6b-base")
    add(Arch("qwen3", 2048, 28), "qwen3-1.7b", "qwen3-1.7b-base")
    add(Arch("qwen3", 2560, 36), "qwen3-4b", "qwen3-4b-base")
    add(Arch("qwen3", 4096, 36), "qwen3-8b", "qwen3-8b-base")
    add(Arch("llama", 576, 30), "smollm2-135m", "smollm2-135m-instruct")
    add(Arch("llama", 960, 32), "smollm2-360m", "smollm2-360m-instruct")
    add(Arch("llama", 2048, 24), "smollm2-1.7b", "smollm2-1.7b-instruct")
    add(Arch("phi3", 3072, 32), "phi-3-mini-4k-instruct", "phi-3-mini-128k-instruct")
    return known


KNOWN: dict[str, Arch] = _table()

# Re-uploads and quantized copies of a checkpoint are the same model
_COPY_SUFFIXES = re.compile(
    r"(?:-unsloth)?(?:-bnb)?-(?:4bit|8bit)$|-gguf$|-awq$|-gptq(?:-int[48])?$|-fp8$|-hf$|-unsloth$"
)


def normalize(name: str) -> str:
    """'unsloth/gemma-3-270m-it-unsloth-bnb-4bit' -> 'gemma-3-270m-it'; a folder path -> its
    last component; a Hugging Face cache path ('.../models--google--gemma-3-270m/snapshots/
    <commit>') -> the model's name."""
    text = str(name).strip().rstrip("/\\")
    path = PureWindowsPath(text) if "\\" in text else PurePosixPath(text)
    cached = [p for p in path.parts if p.startswith("models--")]
    last = cached[-1].rsplit("--", 1)[-1] if cached else path.name
    short = last.lower()
    previous = None
    while previous != short:
        previous = short
        short = _COPY_SUFFIXES.sub("", short)
    return short


@dataclass(frozen=True)
class BaseCheck:
    """What the adapter's base name says, as GET /adapters/{name} reports it."""

    status: str  # "matches", "same_architecture", "unverified", "none"
    name: str | None
    detail: str

    def as_dict(self) -> dict[str, str | None]:
        return {"status": self.status, "name": self.name, "detail": self.detail}


class KnownToDiffer(ValueError):
    """The adapter names a model known to differ from the served base."""


def judge(
    name: str | None, base_names: set[str] | frozenset[str], hidden_size: int, num_layers: int
) -> BaseCheck:
    """Judge an adapter's base name against the served base (whose tensors it already fits).
    Raises KnownToDiffer with the reason when the name is a model known to differ."""
    if not name:
        return BaseCheck("none", None, "the adapter does not name its base model")
    short = normalize(name)
    own = {normalize(n) for n in base_names if n}
    served = sorted(own)[0] if own else "the served base"
    if short in own:
        return BaseCheck("matches", name, f"names the served base model ({served})")
    named = KNOWN.get(short)
    if named is None:
        return BaseCheck(
            "unverified",
            name,
            f"{name!r} is not a model this server can judge; the adapter's tensors fit the "
            f"served base ({served}), so it is served: make sure it was trained on that base",
        )
    identity = next((n for n in sorted(own) if n in KNOWN), None)
    if (named.hidden_size, named.num_layers) != (hidden_size, num_layers):
        raise KnownToDiffer(
            f"adapter was trained on {name!r}, a {named.family} model with hidden size "
            f"{named.hidden_size} and {named.num_layers} layers, but this server serves "
            f"{served} (hidden size {hidden_size}, {num_layers} layers)"
        )
    if identity is not None:
        raise KnownToDiffer(
            f"adapter was trained on {name!r}, another model than the served {identity} "
            "although of the same shape (its weights differ, e.g. an instruction-tuned "
            f"sibling): serve {name!r} as SWAPSERVE_BASE_MODEL, or retrain on {identity}"
        )
    return BaseCheck(
        "same_architecture",
        name,
        f"{name!r} has the served base's architecture; whether the served weights are the same "
        "cannot be told from the names",
    )
