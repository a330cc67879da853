"""Training jobs behind the HTTP API: the trainer's JobManager bound to this server's base
model and adapter registry.

The routes stay thin: they turn a request into files on disk and call ``submit``. Everything
that can be refused is refused here, before a worker process starts: the config, the data,
the base model, the name. A finished adapter is registered through the registry's own
validation (``register_path``), on the server's event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer.base_model import bundled_model
from trainer.config import ConfigError
from trainer.data import DataError, load_jsonl
from trainer.jobs import JobConflict, JobManager, JobStateError
from trainer.methods import check_against_base, default_quantization, get_method
from trainer.objectives import build_config, get_objective
from trainer.records import TERMINAL
from trainer.tokens import check_trainable_tokens

if TYPE_CHECKING:
    from server.adapters import AdapterRegistry

logger = logging.getLogger(__name__)


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
        serves_token_rows: bool = True,
    ):
        self.registry = registry
        # False on an engine that cannot apply trained token rows (vllm): jobs train none
        self.serves_token_rows = serves_token_rows
        self.loop = loop
        self.base_spec = base_spec
        self.base_path = base_path
        self.quantization = quantization
        self.device = device
        self.served_model_name = served_model_name
        self.register_timeout_s = register_timeout_s
        self._tok: Any = None  # the base's tokenizer, for dry runs (loaded on the first)
        from server.train_compare import CompareService

        # method comparisons: their records beside the jobs' folder
        self.compare = CompareService(self, root.parent / "train-compare")
        self.manager = JobManager(
            root,
            adapters_dir=adapters_dir,
            max_running=max_running,
            on_success=self._on_success,
            on_finished=self.compare.job_finished,
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
            default = bundled_model(None)
            ours = repr(self.base_spec) if self.base_spec else f"the bundled {default.name}"  # type: ignore[union-attr]
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
        if not self.serves_token_rows:
            tokens = fields.setdefault("trainable_tokens", "none")
            if tokens != "none":
                raise ConfigError(
                    "trainable_tokens",
                    "this server's engine (vllm) cannot serve trained token rows, so an "
                    "adapter trained with them could not be registered here: use 'none' "
                    "(the default on this engine), or train on a server with SWAPSERVE_ENGINE=hf",
                )
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
        named = bundled_model(requested)
        if named is not None:  # a bundled model's short name, or "bundled" for the default
            return named is bundled_model(self.base_spec)
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
        meta: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Validate everything, queue the job, return its record. Blocking (file reads):
        call it from a thread. ``meta`` is kept on the job record (a comparison's id)."""
        if register:
            # 400 for an unsafe/reserved name, 409 for a taken one (AdapterError).
            self.registry.check_new_name(name, replace=replace)
        fields = self.job_config(kind, config)
        if eval_path is not None:
            fields["eval_file"] = str(eval_path)
        # Validated here as well as in submit: a refused request must not have moved an
        # old adapter folder aside (below).
        eval_file = Path(fields["eval_file"]) if fields.get("eval_file") else None
        self.check_data(kind, data_path, data_label, eval_file, eval_label)
        if replace:
            self._move_aside(name)
        job_id = self.manager.submit(
            kind,
            fields,
            data_path,
            name,
            meta={**(meta or {}), "register": register, "replace": replace},
        )
        return self.manager.get(job_id)

    def check_data(
        self,
        kind: str,
        data_path: Path,
        data_label: str,
        eval_path: Path | None = None,
        eval_label: str | None = None,
    ) -> None:
        """The data's structure for this objective (DataError naming the user's file)."""
        task = get_objective(kind).task
        _load_labelled(data_path, task, data_label)
        if eval_path is not None:
            _load_labelled(eval_path, task, eval_label or "eval_file")

    def dry_run(
        self,
        kind: str,
        config: dict[str, Any] | None,
        data_path: Path,
        *,
        data_label: str,
        eval_path: Path | None = None,
        eval_label: str | None = None,
    ) -> dict[str, Any]:
        """What a job would train on, refused exactly as `submit` would refuse it: the
        first example with its loss mask, token lengths, the token rows to be trained.
        Only the tokenizer is loaded. Blocking: call it from a thread."""
        from trainer.cli import _dry_run_tokens
        from trainer.data import LOSS_CLOSE, LOSS_OPEN, dry_run

        fields = self.job_config(kind, config)
        if eval_path is not None:
            fields["eval_file"] = str(eval_path)
        task = get_objective(kind).task
        _load_labelled(data_path, task, data_label)
        if eval_path is not None:
            _load_labelled(eval_path, task, eval_label or "eval_file")
        cfg = build_config(kind, fields)
        method = get_method(str(cfg.method))
        tokenizer = self._tokenizer()
        try:
            report = dry_run(data_path, tokenizer, cfg.max_length, task, cfg.loss_turns)
        except DataError as exc:
            raise DataError(exc.problems, data_label) from None
        tokens = _dry_run_tokens(cfg, tokenizer, self.base_path, data_path, task)
        report.pop("path", None)
        report.pop("sha256", None)
        return {
            **report,
            "object": "train.dry_run",
            "kind": kind,
            "loss_open": LOSS_OPEN,
            "loss_close": LOSS_CLOSE,
            "method": method.name,
            "trainable_tokens": tokens.describe()
            if method.trains_token_rows
            else f"trainable tokens: none (method {method.name} trains no embedding rows)",
            "config": {k: v for k, v in cfg.to_dict().items() if k != "eval_file"},
        }

    def _tokenizer(self) -> Any:
        if self._tok is None:
            from transformers import AutoTokenizer

            from trainer.base_model import ensure_chat_template

            tokenizer = AutoTokenizer.from_pretrained(str(self.base_path))
            ensure_chat_template(tokenizer)
            self._tok = tokenizer
        return self._tok

    def card(self, job_id: str) -> dict[str, Any]:
        """The finished adapter's swapserve_card.json."""
        from trainer.common import CARD_NAME

        record = self.manager.get(job_id)
        path = Path(record["output_dir"]) / CARD_NAME
        if record.get("state") != "succeeded" or not path.is_file():
            raise JobStateError(
                f"job {job_id} is {record.get('state')}: a card is written when a job succeeds"
            )
        return json.loads(path.read_text())

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
