"""Helpers shared by the test packages (importable because tests/ is on sys.path)."""

from __future__ import annotations

import socket
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout_s: float, check=None) -> bool:
    """Poll GET /ready until 200 (True) or the deadline (False); a failed load raises.
    `check`, if given, runs before each poll and may raise (e.g. the process died)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check is not None:
            check()
        try:
            r = httpx.get(f"{url}/ready", timeout=2)
            if r.status_code == 200:
                return True
            if r.json().get("status") == "failed":
                raise RuntimeError(r.text)
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    return False


class LiveServer:
    """The real app under the real uvicorn, in a thread of this process."""

    def __init__(self, app, port: int):
        import uvicorn

        self.app = app
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, timeout_s: float = 120) -> LiveServer:

        self.thread.start()
        if wait_ready(self.url, timeout_s):
            return self
        raise TimeoutError("server did not become ready")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def openai(self, api_key: str = "test", **kwargs):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, **kwargs)


def start_live_server(**settings_kwargs) -> LiveServer:
    from server.app import create_app
    from server.config import Settings

    port = free_port()
    settings = Settings(port=port, **settings_kwargs)
    return LiveServer(create_app(settings), port).start()


def start_tiny_server_with_adapter(
    tiny_model_path, tmp_path_factory, prefix: str, *, name: str = "tuned", seed: int = 1
) -> LiveServer:
    """The tiny model served (8 tokens by default) with one random LoRA registered as
    ``name``; the server's data folder is ``server.data_dir``."""
    import httpx

    from tests.tiny_model import build_lora_adapter

    data = tmp_path_factory.mktemp(f"{prefix}-data")
    adapter = build_lora_adapter(
        tiny_model_path, tmp_path_factory.mktemp(f"{prefix}-lora") / "a", seed=seed
    )
    server = start_live_server(
        base_model=str(tiny_model_path),
        quantization="none",
        max_model_len=256,
        default_max_tokens=8,
        data_dir=data,
    )
    r = httpx.post(f"{server.url}/adapters", json={"name": name, "path": str(adapter)})
    assert r.status_code == 201, r.text
    server.data_dir = data
    return server


class ServerProcess:
    """`swapserve serve` in a process of its own, so a test can SIGTERM or SIGKILL it.

    ``argv`` replaces the command (a test harness that wraps server.cli); the server's
    output goes to ``log_path`` (read it with ``log()``).
    """

    def __init__(
        self,
        model_path,
        data_dir,
        *,
        env: dict[str, str] | None = None,
        argv: list[str] | None = None,
    ):
        import os
        import sys
        from pathlib import Path

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}-server-{self.port}.log"
        root = Path(__file__).resolve().parent.parent
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(root), os.environ.get("PYTHONPATH")) if p
            ),
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "SWAPSERVE_DATA_DIR": str(self.data_dir),
            "SWAPSERVE_MAX_MODEL_LEN": "256",
            "SWAPSERVE_DEFAULT_MAX_TOKENS": "16",
            **(env or {}),
        }
        self.argv = (argv or [sys.executable, "-m", "server.cli"]) + [
            "serve",
            "--base-model",
            str(model_path),
            "--quantization",
            "none",
            "--device",
            "cpu",
            "--port",
            str(self.port),
        ]
        self.cwd = root
        self.proc = None

    def start(self, timeout_s: float = 120) -> ServerProcess:
        import subprocess

        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=self.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        finally:
            log.close()

        def exited() -> None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")

        if wait_ready(self.url, timeout_s, check=exited):
            return self
        self.kill()
        raise TimeoutError(f"server did not become ready:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout_s: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout_s)

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind, as in a crash or an OOM kill."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def stop(self, timeout_s: float = 60) -> int | None:
        """SIGTERM and wait (the graceful path); SIGKILL if it does not end in time."""
        import signal
        import subprocess

        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.returncode

    def openai(self, api_key: str = "test", **kwargs):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, **kwargs)


def greedy_alone_and_batched(
    engine, prompts: list[str], max_tokens: int = 10, adapters: list[str | None] | None = None
):
    """Greedy token ids of each prompt run alone, then of all of them run together on a
    started engine: a batch-invariant engine gives the same lists. ``adapters`` gives each
    prompt its adapter (None: the base), so the batch is a mixed-adapter one."""
    import asyncio

    from server.engine.base import GenerationRequest, SamplingParams

    rows = adapters or [None] * len(prompts)

    def req(i: int) -> GenerationRequest:
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        return GenerationRequest(f"g{i}", engine.tokenize(prompts[i]), params, adapter=rows[i])

    async def collect(r: GenerationRequest) -> list[int]:
        return [t async for out in engine.generate(r) for t in out.token_ids]

    async def together() -> list[list[int]]:
        return list(await asyncio.gather(*(collect(req(i)) for i in range(len(prompts)))))

    alone = [asyncio.run(collect(req(i))) for i in range(len(prompts))]
    return alone, asyncio.run(together())


def load_causal_lm(path):
    """A plain transformers model from a folder, in eval mode (a fresh copy per call)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def multi_lora_logits(model, adapters, rows: list[str], inputs):
    """Logits of ``inputs`` repeated once per row, row i under adapter rows[i] (MultiAdapter)."""
    import torch

    adapters.set_rows(rows, 0)
    try:
        with torch.inference_mode():
            return model(inputs.expand(len(rows), -1)).logits
    finally:
        adapters.clear_rows()


def model_with_adapters(model_path, adapters: dict):
    """A fresh model with the engine's adapter layers holding every adapter (name -> folder),
    each read by the kind its adapter_config.json names."""
    import torch

    from server.engine.multi_adapter import MultiAdapter

    model = load_causal_lm(model_path)
    multi = MultiAdapter(model, torch.device("cpu"), torch.float32)
    for name, path in adapters.items():
        multi.add(read_adapter(name, path))
    return model, multi


def read_adapter(name: str, path, dtype=None):
    """An adapter folder's weights, read by its kind (server/engine/kinds)."""
    import json
    from pathlib import Path

    import torch

    from server.engine.kinds import kind_for

    config = json.loads((Path(path) / "adapter_config.json").read_text())
    kind = kind_for(config["peft_type"])
    assert kind is not None, config["peft_type"]
    return kind.read(name, Path(path), dtype or torch.float32)


def peft_greedy(model_path, adapter, prompt_ids: list[int], n: int) -> list[int]:
    """PEFT's greedy continuation (``adapter`` None: the base): its forward over the whole
    sequence at every step, no cache, as the reference for served tokens."""
    import torch
    from peft import PeftModel

    model = load_causal_lm(model_path)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    ids = list(prompt_ids)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt_ids) :]
