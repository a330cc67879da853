"""Training jobs behind the HTTP API: the trainer's JobManager bound to this server's base
model and adapter registry.

The routes stay thin: they turn a request into files on disk and call ``submit``. Everything
that can be refused is refused here, before a worker process starts: the config, the data,
the base model, the name. A finished adapter is registered through the registry's own
validation (``register_path``), on the server's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer.base_model import BUNDLED_MODEL_NAME
from trainer.config import ConfigError
from trainer.data import DataError, load_jsonl
from trainer.jobs import JobConflict, JobManager
from trainer.methods import check_against_base, default_quantization
from trainer.objectives import build_config, get_objective
from trainer.records import TERMINAL
from trainer.tokens import check_trainable_tokens

if TYPE_CHECKING:
    from server.adapters import AdapterRegistry

logger = logging.getLogger(__name__)

BUNDLED_SPECS = ("", "bundled", BUNDLED_MODEL_NAME)


class BaseModelMismatch(ConfigError):
    """The request names a base model other than the one this server serves."""


def is_settled(record: dict[str, Any]) -> bool:
    """Terminal, and a succeeded job has also been through registration: nothing more
    will happen to it, so a live event stream may end."""
    state = record.get("state")
    if state not in TERMINAL:
        return False
    return state != "succeeded" or bool(record.get("notified"))


class TrainingService:
    def __init__(
        self,
        root: Path,
        adapters_dir: Path,
        *,
        registry: AdapterRegistry,
        loop: asyncio.AbstractEventLoop,
        base_spec: str | None,
        base_path: Path,
        quantization: str,
        device: str,
        served_model_name: str,
        max_running: int = 1,
        register_timeout_s: float = 600.0,
    ):
        self.registry = registry
        self.loop = loop
        self.base_spec = base_spec
        self.base_path = base_path
        self.quantization = quantization
        self.device = device
        self.served_model_name = served_model_name
        self.register_timeout_s = register_timeout_s
        self.manager = JobManager(
            root,
            adapters_dir=adapters_dir,
            max_running=max_running,
            on_success=self._on_success,
        )

    # --- lifecycle ----------------------------------------------------------------------------

    def recover(self) -> list[str]:
        # Runs on a worker thread: it may call _on_success, which waits on the event loop.
        return self.manager.recover()

    def close(self, timeout_s: float = 30.0) -> None:
        # Workers get SIGTERM and end 'interrupted'; one still running after timeout_s is
        # killed and recorded 'interrupted' as well.
        self.manager.close(timeout_s=timeout_s)

    # --- submit -------------------------------------------------------------------------------

    def job_config(self, kind: str, config: dict[str, Any] | None) -> dict[str, Any]:
        """The request's config with this server's base filled in; another base is refused."""
        if config is not None and not isinstance(config, dict):
            raise ConfigError("config", f"must be a JSON object, got {type(config).__name__}")
        fields = dict(config or {})
        requested = fields.get("base_model")
        if requested is not None and not self._is_our_base(requested):
            ours = repr(self.base_spec) if self.base_spec else f"the bundled {BUNDLED_MODEL_NAME}"
            raise BaseModelMismatch(
                "base_model",
                f"{requested!r} is not this server's base model; it serves {ours} "
                f"({self.base_path}), and an adapter trained on another base could not be "
                "served here. Leave base_model out to train on the server's base.",
            )
        # The worker loads the very folder the server loaded (no second conversion).
        fields["base_model"] = str(self.base_path)
        if "quantization" not in fields:
            # the server's own precision, unless the method fixes one (lora and full train
            # on the unquantized folder, qlora on NF4)
            quantization = default_quantization(fields.get("method"), self.quantization)
            if quantization is not None:
                fields["quantization"] = quantization
        fields.setdefault("device", self.device)
        cfg = build_config(kind, fields)  # raises ConfigError now, not in the worker
        # the method against the base's structure: module names, context, quantized folder
        check_against_base(cfg, self.base_path)
        # an explicit token list is checked against this base's tokenizer (loaded once)
        check_trainable_tokens(cfg.trainable_tokens, self.base_path)
        return fields

    def _is_our_base(self, requested: Any) -> bool:
        if not isinstance(requested, str):
            return False
        if requested == self.served_model_name:
            return True
        if requested in BUNDLED_SPECS:
            return self.base_spec in (None, *BUNDLED_SPECS)
        try:
            return Path(requested).expanduser().resolve() == self.base_path.resolve()
        except OSError:
            return False

    def submit(
        self,
        kind: str,
        name: str,
        config: dict[str, Any] | None,
        data_path: Path,
        *,
        data_label: str,
        eval_path: Path | None = None,
        eval_label: str | None = None,
        register: bool = True,
        replace: bool = False,
    ) -> dict[str, Any]:
        """Validate everything, queue the job, return its record. Blocking (file reads):
        call it from a thread."""
        if register:
            # 400 for an unsafe/reserved name, 409 for a taken one (AdapterError).
            self.registry.check_new_name(name, replace=replace)
        fields = self.job_config(kind, config)
        if eval_path is not None:
            fields["eval_file"] = str(eval_path)
        task = get_objective(kind).task
        # Validated here as well as in submit: a refused request must not have moved an
        # old adapter folder aside (below).
        _load_labelled(data_path, task, data_label)
        if fields.get("eval_file"):
            _load_labelled(Path(fields["eval_file"]), task, eval_label or "eval_file")
        if replace:
            self._move_aside(name)
        job_id = self.manager.submit(
            kind,
            fields,
            data_path,
            name,
            meta={"register": register, "replace": replace},
        )
        return self.manager.get(job_id)

    def _move_aside(self, name: str) -> None:
        """Retraining a name this server trained before: the old output folder (the
        registry holds its own copy) goes to ``.replaced/`` instead of blocking the job."""
        for rec in self.manager.list():
            if rec["name"] == name and rec["state"] in ("queued", "running"):
                raise JobConflict(f"job {rec['id']} is already training {name!r}")
        old = self.manager.adapters_dir / name
        if old.exists():
            aside = self.manager.adapters_dir / ".replaced" / f"{name}-{int(time.time())}"
            aside.parent.mkdir(parents=True, exist_ok=True)
            os.replace(old, aside)
            logger.info("replace=true: moved the old output of %r to %s", name, aside)

    # --- registration (on the manager's monitor thread) -----------------------------------------

    def _on_success(self, record: dict[str, Any]) -> None:
        meta = record.get("meta") or {}
        if not meta.get("register", True):
            return
        coro = self.registry.register_path(
            record["name"], Path(record["output_dir"]), replace=bool(meta.get("replace"))
        )
        self._run_on_loop(coro)
        logger.info("job %s: registered adapter %r", record["id"], record["name"])

    def _run_on_loop(self, coro: Coroutine[Any, Any, Any]) -> Any:
        if self.loop.is_closed():
            coro.close()
            raise RuntimeError("the server's event loop is closed; register the adapter again")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout=self.register_timeout_s)

    # --- views ----------------------------------------------------------------------------------

    @staticmethod
    def view(record: dict[str, Any]) -> dict[str, Any]:
        """The job record as the API shows it (internal paths and pids left out)."""
        meta = record.get("meta") or {}
        out = {k: v for k, v in record.items() if k not in ("pid", "data_path", "meta")}
        out["object"] = "train.job"
        out["register"] = bool(meta.get("register", True))
        out["replace"] = bool(meta.get("replace", False))
        out["registered"] = bool(
            record.get("state") == "succeeded"
            and record.get("notified")
            and out["register"]
            and not record.get("registration_error")
        )
        return out


def _load_labelled(path: Path, task: str, label: str) -> None:
    """load_jsonl, with the user's name for the file in the message instead of a temp path."""
    try:
        load_jsonl(path, task)  # type: ignore[arg-type]
    except DataError as exc:
        raise DataError(exc.problems, label) from None
