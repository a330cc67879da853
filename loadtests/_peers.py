"""Peers the benchmarks compare against, in the same run: llama.cpp and the vLLM engine.

llama.cpp runs through llama-cpp-python (an optional extra) on the very GGUF file the
bundled model ships, with as many threads as this process may use. The vLLM engine runs
as a swapserve server from its own virtual environment (.venv-vllm) when that exists.
Each peer that is missing is skipped with a line that says how to get it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
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


def _busy_and_total() -> tuple[int, int]:
    """The machine's busy and total CPU time so far (/proc/stat's first line, in ticks)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle, iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


def wait_for_quiet(
    busy_cores: float = 0.15, window_s: float = 0.2, timeout_s: float = 10.0
) -> float:
    """Wait until the whole machine's CPU use over `window_s` is under `busy_cores` cores
    (or `timeout_s` passes), so that a peer's round does not run beside the previous
    peer's background work: the vLLM engine's server keeps about a core busy for a second
    after a request. Returns the seconds waited. Needs Linux's /proc/stat (else no wait)."""
    start = time.perf_counter()
    cores = os.cpu_count() or 1
    try:
        busy, total = _busy_and_total()
    except (OSError, ValueError, IndexError):
        return 0.0
    while time.perf_counter() - start < timeout_s:
        time.sleep(window_s)
        now_busy, now_total = _busy_and_total()
        if now_total > total and (now_busy - busy) / (now_total - total) * cores < busy_cores:
            break
        busy, total = now_busy, now_total
    return time.perf_counter() - start


def bundled_gguf(base: str) -> Path | None:
    """A bundled model's own GGUF file (the one swapserve converts at first start), assembled
    once into the cache folder where its package ships it in parts; None for another base."""
    from trainer.base_model import bundled_model, default_cache_dir

    model = bundled_model(base)
    if model is None:
        return None
    target = default_cache_dir() / "gguf" / model.gguf_name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = model.gguf(Path(scratch))
        if Path(scratch) not in built.parents:
            return built  # the package's own file, read in place
        os.replace(built, target)
    return target


class LlamaCpp:
    """Greedy decoding of a bundled model's GGUF by llama.cpp, timed from first to last token."""

    def __init__(self, gguf: Path, threads: int | None = None, n_ctx: int = 1024):
        from llama_cpp import Llama

        self.threads = threads or cpu_threads()
        self.llm = Llama(
            model_path=str(gguf),
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
    """llama.cpp on the benchmark's bundled base's own GGUF; None (saying why) when it cannot
    run or the base is a model folder."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print(LLAMA_CPP_HOW)
        return None
    gguf = bundled_gguf(base)
    if gguf is None:
        print(f"llama.cpp: skipped (it runs a bundled model's own GGUF; the base is {base})")
        return None
    return LlamaCpp(gguf, threads)


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
