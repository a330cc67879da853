"""AdapterRegistry: validate, store, load and evict adapters of every kind; survive restarts.

Registration is all-or-nothing: files are staged, validated, loaded into the engine, moved
into the store and only then recorded in registry.json (written atomically). A crash at
any point leaves either the old registry or the new one, never a half-registered adapter;
leftovers are swept at start-up.

Residency: at most `max_loras` adapters live in the engine (on the compute device) and at
most `max_cpu_loras` in memory altogether (the others as CPU copies, reloaded without
touching disk); the rest wait on disk. The least recently used adapter that no request
holds moves down first; a request brings its adapter back up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import tarfile
import time
import uuid
import zipfile
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from server.adapter_validation import (
    CONFIG_FILE,
    PICKLE_SUFFIXES,
    PICKLED_WEIGHTS,
    WEIGHTS_FILE,
    AdapterError,
    AdapterSpec,
    check_name,
    validate_adapter_dir,
)
from server.engine.base import BASE_ADAPTER, Engine, EngineError
from server.metrics import ServerMetrics
from trainer.atomic import write_json_atomic

logger = logging.getLogger(__name__)


@dataclass
class AdapterRecord:
    name: str
    path: str  # the stored copy
    source: str  # where it was registered from
    rank: int | None  # LoRA's largest rank; None for other kinds
    alpha: float | None
    target_modules: list[str]
    base_model_name: str | None
    size_bytes: int
    created: int
    version: str
    use_rslora: bool = False
    trained_tokens: list[int] = field(default_factory=list)  # ids whose rows it trained
    kind: str = "lora"  # server/engine/kinds/<kind>.py
    peft_type: str = "LORA"
    parameters: int = 0  # trained numbers it applies
    virtual_tokens: int = 0  # context positions it takes before every prompt
    # what its base_model_name_or_path says: matches / same_architecture / unverified / none
    base_check: dict[str, str | None] = field(default_factory=dict)


@dataclass
class AdapterState:
    """Run-time facts about one adapter (not persisted)."""

    engine_name: str  # PEFT adapter names may not contain '.', so each version gets an id
    loaded: bool = False  # on the compute device
    in_host: bool = False  # a copy in host memory (after an eviction from the device)
    pins: int = 0
    requests: int = 0
    load_count: int = 0
    evict_count: int = 0
    last_used: float = 0.0
    last_load_ms: float | None = None
    retired: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass
class UploadLimits:
    max_bytes: int = 512 * 1024 * 1024
    max_members: int = 64


class AdapterRegistry:
    def __init__(
        self,
        engine: Engine,
        root: Path,
        *,
        base_id: str,
        max_loras: int,
        max_lora_rank: int,
        max_cpu_loras: int | None = None,
        limits: UploadLimits | None = None,
        metrics: ServerMetrics | None = None,
    ):
        self.engine = engine
        self.root = root
        self.store = root / "store"
        self.staging = root / ".staging"
        self.quarantine = root / "quarantine"
        self.index_path = root / "registry.json"
        self.base_id = base_id
        self.max_loras = max_loras
        self.max_cpu_loras = max_cpu_loras if max_cpu_loras is not None else max_loras
        self.max_lora_rank = max_lora_rank
        self.limits = limits or UploadLimits()
        self.metrics = metrics
        self.records: dict[str, AdapterRecord] = {}
        self.states: dict[str, AdapterState] = {}
        self._names: dict[str, asyncio.Lock] = {}  # one lock per name: atomic registration
        self._residency = asyncio.Condition()
        for d in (self.store, self.staging, self.quarantine):
            d.mkdir(parents=True, exist_ok=True)

    # --- start-up ---------------------------------------------------------------------------

    def recover(self) -> None:
        """Read registry.json, quarantine what no longer validates, sweep leftovers."""
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True, exist_ok=True)
        records: dict[str, Any] = {}
        if self.index_path.is_file():
            try:
                records = json.loads(self.index_path.read_text()).get("adapters", {})
            except (OSError, ValueError) as exc:
                bad = self.quarantine / f"registry-{int(time.time())}.json"
                logger.error("registry.json is unreadable (%s); moved to %s", exc, bad)
                os.replace(self.index_path, bad)
        changed = False
        for name, raw in records.items():
            try:
                record = AdapterRecord(**raw)
                spec = self._validate(Path(record.path))
                _refresh(record, spec)  # a record written before a field existed gains it
            except (TypeError, AdapterError) as exc:
                logger.error(
                    "adapter %r failed validation at start-up, quarantined: %s",
                    name,
                    getattr(exc, "message", exc),
                )
                path = Path(raw.get("path", "")) if isinstance(raw, dict) else None
                if path and path.is_dir():
                    os.replace(path, self.quarantine / f"{name}-{uuid.uuid4().hex[:8]}")
                changed = True
                continue
            self.records[name] = record
            self.states[name] = AdapterState(engine_name=self._engine_name())
        keep = {Path(r.path).name for r in self.records.values()}
        for folder in self.store.iterdir():
            if folder.name not in keep:  # stored but never recorded: a crash mid-registration
                shutil.rmtree(folder, ignore_errors=True)
        if changed:
            self._persist()
        logger.info("adapter registry: %d adapters", len(self.records))

    # --- queries ------------------------------------------------------------------------------

    def resolve(self, model: str) -> str | None:
        """The adapter name for a `model` id, or None; raises AdapterError 404 if unknown."""
        if model in self.records:
            return model
        raise self.unknown_model(model)

    @staticmethod
    def unknown_model(model: str) -> AdapterError:
        return AdapterError(
            404,
            f"The model `{model}` does not exist. GET /v1/models lists what this server serves.",
            "model_not_found",
            "model",
        )

    def describe(self, name: str) -> dict[str, Any]:
        record = self.records.get(name)
        if record is None:
            raise AdapterError(
                404, f"adapter {name!r} is not registered", "adapter_not_found", "name"
            )
        state = self.states[name]
        return {
            **asdict(record),
            "object": "adapter",
            "id": record.name,
            "parent": self.base_id,
            "location": "device" if state.loaded else "host" if state.in_host else "disk",
            "in_flight": state.pins,
            "requests": state.requests,
            "load_count": state.load_count,
            "evict_count": state.evict_count,
            "last_load_ms": state.last_load_ms,
            # Unix time; state.last_used is monotonic (the LRU order), which means nothing
            # outside this process
            "last_used": (
                int(time.time() - (time.monotonic() - state.last_used)) if state.last_used else None
            ),
        }

    def list(self) -> list[dict[str, Any]]:
        return [self.describe(n) for n in sorted(self.records)]

    def loaded_count(self) -> int:
        return sum(1 for s in self.states.values() if s.loaded)

    # --- registration -------------------------------------------------------------------------

    def _engine_name(self) -> str:
        return f"lora_{uuid.uuid4().hex[:12]}"

    def _validate(self, path: Path) -> AdapterSpec:
        return validate_adapter_dir(
            path,
            base=self.engine.model_shape(),
            max_rank=self.max_lora_rank,
            max_bytes=self.limits.max_bytes,
        )

    def context_tokens(self, name: str | None) -> int:
        """Positions of every request's context the adapter takes (virtual tokens)."""
        record = self.records.get(name) if name else None
        return record.virtual_tokens if record is not None else 0

    def _reserved(self) -> set[str]:
        return {self.base_id, BASE_ADAPTER, "base"}

    def _check_new_name(self, name: str, replace: bool) -> None:
        check_name(name, self._reserved())
        if name.startswith("ab:"):
            raise AdapterError(
                400, "names starting with 'ab:' are reserved", "invalid_name", "name"
            )
        if name in self.records and not replace:
            raise AdapterError(
                409,
                f"adapter {name!r} already exists; pass replace=true (load_inplace for the vLLM "
                "route) to replace it",
                "adapter_exists",
                "name",
            )

    def check_new_name(self, name: str, *, replace: bool = False) -> None:
        """Raise the AdapterError that registering ``name`` would raise (400 bad name, 409
        taken): the trainer asks before a job starts, not after it has trained."""
        self._check_new_name(name, replace)

    def new_staging_dir(self) -> Path:
        path = self.staging / uuid.uuid4().hex
        path.mkdir(parents=True)
        return path

    async def register_path(self, name: str, source: Path, *, replace: bool = False) -> dict:
        self._check_new_name(name, replace)
        source = source.expanduser()
        if not source.exists():
            raise AdapterError(
                404, f"no file or folder at {source} on this server", "path_not_found", "path"
            )
        if not source.is_dir():
            raise AdapterError(
                400, f"adapter path {source} is not a folder on this server", "invalid_path", "path"
            )
        staging = self.new_staging_dir()
        try:
            await asyncio.to_thread(_copy_adapter_files, source, staging, self.limits)
            return await self._register_staged(name, staging, str(source), replace)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    async def register_archive(
        self, name: str, archive: Path, filename: str, *, replace: bool = False
    ) -> dict:
        self._check_new_name(name, replace)
        staging = self.new_staging_dir()
        try:
            await asyncio.to_thread(_extract_archive, archive, filename, staging, self.limits)
            return await self._register_staged(name, staging, f"upload:{filename}", replace)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    async def _register_staged(self, name: str, staging: Path, source: str, replace: bool) -> dict:
        lock = self._names.setdefault(name, asyncio.Lock())
        async with lock:  # ensure atomicity per adapter name
            self._check_new_name(name, replace)
            spec = await asyncio.to_thread(self._validate, staging)
            version = uuid.uuid4().hex[:12]
            final = self.store / f"{name}-{version}"
            os.replace(staging, final)
            state = AdapterState(engine_name=self._engine_name())
            started = time.perf_counter()
            try:
                # served only after the engine really loaded it
                await self.engine.load_adapter(state.engine_name, final)
            except AdapterError:
                shutil.rmtree(final, ignore_errors=True)
                raise  # the engine said why (e.g. a kind it does not serve)
            except Exception as exc:
                shutil.rmtree(final, ignore_errors=True)
                if isinstance(exc, EngineError) and 400 <= exc.status < 500:
                    # the engine says why it cannot serve this adapter (e.g. vllm: token rows)
                    raise AdapterError(
                        exc.status, str(exc), exc.code or "unsupported_adapter"
                    ) from exc
                raise AdapterError(
                    400, f"the engine could not load the adapter: {exc}", "invalid_weights"
                ) from exc
            state.loaded = True
            state.load_count = 1
            state.last_load_ms = (time.perf_counter() - started) * 1000
            state.last_used = time.monotonic()
            record = AdapterRecord(
                name=name,
                path=str(final),
                source=source,
                rank=spec.rank,
                alpha=spec.alpha,
                target_modules=spec.target_modules,
                base_model_name=spec.base_model_name,
                size_bytes=spec.size_bytes,
                created=int(time.time()),
                version=version,
                use_rslora=spec.use_rslora,
                trained_tokens=spec.trained_tokens,
            )
            _refresh(record, spec)
            old_record = self.records.get(name)
            old_state = self.states.get(name)
            self.records[name] = record
            self.states[name] = state
            try:
                self._persist()
            except OSError:
                # undo in memory and engine: what is stored must match what is served
                if old_record is not None and old_state is not None:
                    self.records[name], self.states[name] = old_record, old_state
                else:
                    self.records.pop(name, None)
                    self.states.pop(name, None)
                await self.engine.unload_adapter(state.engine_name)
                shutil.rmtree(final, ignore_errors=True)
                raise
            self._event(name, "registered")
            self._event(name, "loaded")
            if old_record is not None and old_state is not None:
                asyncio.create_task(self._retire(old_record, old_state))
            await self._trim()
            logger.info(
                "registered %s adapter %s (%d parameters, %d modules, base %s) from %s",
                spec.kind,
                name,
                spec.parameters,
                len(spec.target_modules),
                spec.base_check.get("status"),
                source,
            )
            return self.describe(name)

    async def unregister(self, name: str, *, wait_s: float = 60.0) -> None:
        lock = self._names.setdefault(name, asyncio.Lock())
        async with lock:
            record = self.records.get(name)
            if record is None:
                raise AdapterError(
                    404, f"adapter {name!r} is not registered", "adapter_not_found", "name"
                )
            state = self.states[name]
            # new requests see it gone at once; running ones finish on it
            del self.records[name]
            del self.states[name]
            self._persist()
        self._event(name, "unloaded")
        await self._retire(record, state, wait_s=wait_s)

    async def _retire(
        self, record: AdapterRecord, state: AdapterState, wait_s: float = 600.0
    ) -> None:
        state.retired = True
        async with self._residency:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._residency.wait_for(lambda: state.pins == 0), timeout=wait_s
                )
        await self.engine.unload_adapter(state.engine_name)
        state.loaded = state.in_host = False
        shutil.rmtree(record.path, ignore_errors=True)

    def _persist(self) -> None:
        data = {"adapters": {n: asdict(r) for n, r in sorted(self.records.items())}}
        write_json_atomic(self.index_path, data)

    def _event(self, name: str, event: str) -> None:
        if self.metrics is not None:
            self.metrics.adapter_events.labels(name, event).inc()

    # --- residency ------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def use(self, name: str | None) -> AsyncIterator[str | None]:
        """Pin an adapter for one request and make sure it is on the device.

        Yields the engine's name for it (None for the base model).
        """
        if name is None:
            yield None
            return
        state = self.states.get(name)
        if state is None:
            self.resolve(name)  # raises 404
            raise AssertionError("unreachable")
        state.pins += 1
        state.requests += 1
        state.last_used = time.monotonic()
        try:
            await self._ensure_loaded(name, state)
            yield state.engine_name
        finally:
            state.pins -= 1
            state.last_used = time.monotonic()
            async with self._residency:
                self._residency.notify_all()
            if self.loaded_count() > self.max_loras:
                await self._trim()

    async def _ensure_loaded(self, name: str, state: AdapterState) -> None:
        async with state.lock:
            if state.loaded:
                return
            record = self.records.get(name)
            if record is None:
                raise AdapterError(
                    404, f"adapter {name!r} was unregistered", "model_not_found", "model"
                )
            started = time.perf_counter()
            await self.engine.load_adapter(state.engine_name, Path(record.path))
            state.loaded = True
            state.in_host = False
            state.load_count += 1
            state.last_load_ms = (time.perf_counter() - started) * 1000
            self._event(name, "loaded")
        await self._trim()

    async def _trim(self) -> None:
        """Least recently used first: device -> host memory (max_loras), host -> disk
        (max_cpu_loras). Never an adapter that a request holds."""
        while self.loaded_count() > self.max_loras:
            victim = self._lru(lambda s: s.loaded and s.pins == 0)
            if victim is None:
                break  # every resident adapter is in use: over the limit until one is released
            state = self.states[victim]
            async with state.lock:
                if not state.loaded or state.pins:
                    continue
                await self.engine.offload_adapter(state.engine_name)
                state.loaded = False
                state.in_host = True
                state.evict_count += 1
            self._event(victim, "evicted")
        # max_cpu_loras bounds every adapter held in memory, on the device or not (vLLM's
        # meaning), so it is never below max_loras
        while self._in_memory() > self.max_cpu_loras:
            victim = self._lru(lambda s: s.in_host)
            if victim is None:
                break
            state = self.states[victim]
            async with state.lock:
                if state.in_host:
                    await self.engine.drop_host_copy(state.engine_name)
                    state.in_host = False
            self._event(victim, "to_disk")

    def _in_memory(self) -> int:
        return sum(1 for s in self.states.values() if s.loaded or s.in_host)

    def _lru(self, eligible: Callable[[AdapterState], bool]) -> str | None:
        candidates = [
            (s.last_used, n) for n, s in self.states.items() if eligible(s) and not s.lock.locked()
        ]
        return min(candidates)[1] if candidates else None


def _refresh(record: AdapterRecord, spec: AdapterSpec) -> None:
    """What validation says about the files, onto the record."""
    record.rank = spec.rank
    record.alpha = spec.alpha
    record.target_modules = spec.target_modules
    record.use_rslora = spec.use_rslora
    record.trained_tokens = spec.trained_tokens
    record.kind = spec.kind
    record.peft_type = spec.peft_type
    record.parameters = spec.parameters
    record.virtual_tokens = spec.virtual_tokens
    record.base_check = spec.base_check


def _kept(name: str) -> bool:
    """Files a training run leaves beside the adapter that are pickles (training_args.bin,
    optimizer.pt, ...) are never read, so not stored either. Pickled weights are kept, for
    validation to refuse by name when no safetensors file stands beside them."""
    return name in PICKLED_WEIGHTS or not name.endswith(PICKLE_SUFFIXES)


def _adapter_members(members: list[tuple[str, int, Any]]) -> list[tuple[str, int, Any]]:
    """The files of the adapter folder in an archive: those beside the shallowest
    adapter_config.json (a training run's output also holds checkpoint-*/ copies)."""
    configs = [Path(n).parent for n, _, _ in members if Path(n).name == CONFIG_FILE]
    if configs:
        root = min(configs, key=lambda p: len(p.parts))
        members = [m for m in members if Path(m[0]).parent == root]
    chosen = [m for m in members if _kept(Path(m[0]).name)]
    seen: set[str] = set()
    for name, _, _ in chosen:
        base = Path(name).name
        if base in seen:
            raise AdapterError(400, f"archive holds {base!r} twice", "invalid_archive")
        seen.add(base)
    return chosen


def _copy_adapter_files(source: Path, dest: Path, limits: UploadLimits) -> None:
    total = 0
    count = 0
    for entry in source.iterdir():
        if entry.is_symlink():
            raise AdapterError(
                400, f"{entry.name} is a symbolic link; links are refused", "unsafe_archive"
            )
        if not entry.is_file() or not _kept(entry.name):
            continue
        count += 1
        total += entry.stat().st_size
        if count > limits.max_members:
            raise AdapterError(400, f"more than {limits.max_members} files", "adapter_too_large")
        if total > limits.max_bytes:
            raise AdapterError(
                413, f"adapter files exceed {limits.max_bytes} bytes", "adapter_too_large"
            )
        shutil.copy2(entry, dest / entry.name)


def _extract_archive(archive: Path, filename: str, dest: Path, limits: UploadLimits) -> None:
    """Unpack a .tar.gz/.tgz/.tar or .zip of an adapter folder, refusing anything unsafe."""
    lower = filename.lower()
    if not lower.endswith((".tar.gz", ".tgz", ".tar", ".zip")):
        # a name that says nothing (a browser blob, a generated client): read the bytes
        if zipfile.is_zipfile(archive):
            lower = ".zip"
        elif tarfile.is_tarfile(archive):
            lower = ".tar"
    members: list[tuple[str, int, Any]] = []
    if lower.endswith((".tar.gz", ".tgz", ".tar")):
        try:
            tf = tarfile.open(archive)
        except tarfile.TarError as exc:
            raise AdapterError(
                400, f"not a readable tar archive: {exc}", "invalid_archive"
            ) from exc
        with tf:
            for m in tf.getmembers():
                if m.issym() or m.islnk() or m.isdev() or m.isfifo():
                    raise AdapterError(
                        400, f"archive member {m.name!r} is a link or device", "unsafe_archive"
                    )
                if m.isdir():
                    continue
                members.append((m.name, m.size, m))
            _check_members(members, limits)
            for name, _, m in _adapter_members(members):
                target = dest / Path(name).name
                src = tf.extractfile(m)
                if src is None:
                    continue
                with src, target.open("wb") as out:
                    shutil.copyfileobj(src, out)
    elif lower.endswith(".zip"):
        try:
            zf = zipfile.ZipFile(archive)
        except zipfile.BadZipFile as exc:
            raise AdapterError(
                400, f"not a readable zip archive: {exc}", "invalid_archive"
            ) from exc
        with zf:
            for info in zf.infolist():
                if info.is_dir():
                    continue
                mode = (info.external_attr >> 16) & 0o170000
                if mode == 0o120000:
                    raise AdapterError(
                        400, f"archive member {info.filename!r} is a link", "unsafe_archive"
                    )
                members.append((info.filename, info.file_size, info))
            _check_members(members, limits)
            for name, _, info in _adapter_members(members):
                with zf.open(info) as src, (dest / Path(name).name).open("wb") as out:
                    # bounded copy: a zip bomb that lies about its size stops at the limit
                    copied = 0
                    while chunk := src.read(1 << 20):
                        copied += len(chunk)
                        if copied > limits.max_bytes:
                            raise AdapterError(
                                413, "archive unpacks past the size limit", "adapter_too_large"
                            )
                        out.write(chunk)
    else:
        raise AdapterError(
            400,
            "upload a .tar.gz, .tgz, .tar or .zip of the adapter folder",
            "invalid_archive",
            "file",
        )
    if not (dest / CONFIG_FILE).is_file() or not (dest / WEIGHTS_FILE).is_file():
        raise AdapterError(
            400, f"the archive must hold {CONFIG_FILE} and {WEIGHTS_FILE}", "invalid_archive"
        )


def _check_members(members: list[tuple[str, int, Any]], limits: UploadLimits) -> None:
    if len(members) > limits.max_members:
        raise AdapterError(
            400, f"archive has {len(members)} files, over {limits.max_members}", "adapter_too_large"
        )
    total = 0
    for name, size, _ in members:
        parts = Path(name).parts
        if name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
            raise AdapterError(400, f"archive member {name!r} escapes its folder", "unsafe_archive")
        total += size
        if total > limits.max_bytes:
            raise AdapterError(
                413, f"archive unpacks to more than {limits.max_bytes} bytes", "adapter_too_large"
            )
