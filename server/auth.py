"""Bearer API keys with scopes, per-key allow-lists, and per-key limits.

A router's scope is chosen where it is mounted (server/app.py), never in the routes:

    app.include_router(router, dependencies=[Depends(require_scope("admin"))])

Scopes: `inference` (chat, completions, models, RAG search) and `admin` (adapters,
training, collection writes, experiments, metrics); `admin` implies `inference`.
Routes that must stay open (liveness, readiness) are mounted with `require_scope("public")`
so that every route declares a scope and a test can check that none was forgotten.

Keys come from `SWAPSERVE_API_KEYS` (plain keys, for small set-ups and tests) and from a
keys file (`SWAPSERVE_API_KEYS_FILE`, default `<data_dir>/api_keys.json`) that stores only
sha256 hashes, written by `swapserve keys create`. A key is never logged: its name is.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import json
import logging
import math
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.dependencies.models import Dependant
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import APIError, error_body
from trainer.atomic import write_json_atomic

if TYPE_CHECKING:
    from server.config import Settings

logger = logging.getLogger(__name__)

INFERENCE = "inference"
ADMIN = "admin"
PUBLIC = "public"  # declared by open routes; never held by a key
SCOPES = (INFERENCE, ADMIN)
_IMPLIED: dict[str, frozenset[str]] = {
    ADMIN: frozenset({ADMIN, INFERENCE}),
    INFERENCE: frozenset({INFERENCE}),
}

MIN_KEY_CHARS = 16
# words that mark a key copied from an example or a template rather than generated
_PLACEHOLDER_WORDS = (
    "changeme",
    "change-me",
    "change_me",
    "changethis",
    "replaceme",
    "replace-me",
    "placeholder",
    "your-api-key",
    "your_api_key",
    "yourapikey",
    "secret",
    "password",
)
KEY_PREFIX = "ss-"
ANONYMOUS = "anonymous"  # the limits' bucket for requests to a server without keys
KEYS_FILE_NAME = "api_keys.json"

# The key of the request being served. Set by the scope dependency, read where the model
# id is resolved (allow-lists) without threading the key through the serving layer.
_current_key: contextvars.ContextVar[ApiKey | None] = contextvars.ContextVar(
    "swapserve_api_key", default=None
)


class AuthConfigError(ValueError):
    """A key or keys file that must not be used; the message names the fix, never the key."""


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def check_secret(key: str, where: str) -> None:
    """Refuse keys that are short or copied from a template (e.g. "changeme")."""
    if len(key) < MIN_KEY_CHARS:
        raise AuthConfigError(
            f"{where}: an API key must be at least {MIN_KEY_CHARS} characters; "
            "create one with `swapserve keys create`"
        )
    lowered = key.lower()
    if any(word in lowered for word in _PLACEHOLDER_WORDS) or len(set(key)) < 6:
        raise AuthConfigError(
            f"{where}: this API key looks like a placeholder; "
            "create a random one with `swapserve keys create`"
        )


def new_key() -> str:
    """A random key: 256 bits, URL-safe, with a prefix that secret scanners can match."""
    while True:
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        try:
            check_secret(key, "generated key")
            return key
        except AuthConfigError:  # astronomically rare ("secret" by chance): draw again
            continue


@dataclass(frozen=True)
class ApiKey:
    name: str
    sha256: str
    scopes: frozenset[str]
    # allow-lists; None = everything. `models` names adapters: the base is always allowed.
    models: frozenset[str] | None = None
    collections: frozenset[str] | None = None

    def has_scope(self, scope: str) -> bool:
        return scope == PUBLIC or any(scope in _IMPLIED[s] for s in self.scopes)

    def allows_model(self, model: str) -> bool:
        return self.models is None or model in self.models

    def allows_collection(self, collection: str) -> bool:
        return self.collections is None or collection in self.collections


def _scopes(value: Any, where: str) -> frozenset[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise AuthConfigError(f"{where}: scopes must be a non-empty list of {list(SCOPES)}")
    unknown = [s for s in items if s not in SCOPES]
    if unknown:
        raise AuthConfigError(f"{where}: unknown scope {unknown[0]!r}; use one of {list(SCOPES)}")
    return frozenset(items)


def _names(value: Any, field_name: str, where: str) -> frozenset[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise AuthConfigError(f"{where}: {field_name} must be a list of names")
    return frozenset(value)


def parse_api_keys(text: str) -> list[ApiKey]:
    """Plain keys from SWAPSERVE_API_KEYS.

    Either "key:scope,key:scope" (scope defaults to inference), or a JSON list whose items
    are "key:scope" strings or objects {"key", "name"?, "scopes", "models"?, "collections"?}.
    """
    text = text.strip()
    if not text:
        return []
    entries: list[Any]
    if text.startswith("["):
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as exc:
            # the position only: the text holds secrets
            raise AuthConfigError(
                f"SWAPSERVE_API_KEYS is not valid JSON (at char {exc.pos})"
            ) from None
    else:
        entries = [part.strip() for part in text.split(",") if part.strip()]
    keys: list[ApiKey] = []
    for i, entry in enumerate(entries, start=1):
        where = f"SWAPSERVE_API_KEYS entry {i}"
        if isinstance(entry, str):
            # rpartition: the scope follows the last colon; generated keys have none
            key, _, scope = entry.rpartition(":") if ":" in entry else (entry, "", INFERENCE)
            entry = {"key": key, "scopes": [scope.strip() or INFERENCE]}
        if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
            raise AuthConfigError(f"{where}: expected 'key:scope' or an object with a 'key'")
        check_secret(entry["key"], where)
        keys.append(
            ApiKey(
                name=str(entry.get("name") or f"env-{i}"),
                sha256=hash_key(entry["key"]),
                scopes=_scopes(entry.get("scopes", entry.get("scope", INFERENCE)), where),
                models=_names(entry.get("models"), "models", where),
                collections=_names(entry.get("collections"), "collections", where),
            )
        )
    return keys


def load_keys_file(path: Path) -> list[ApiKey]:
    """{"keys": [{"name", "sha256", "scopes", "models"?, "collections"?, "created"?}]}"""
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise AuthConfigError(f"cannot read the API keys file {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise AuthConfigError(f"the API keys file {path} is not valid JSON: {exc}") from None
    entries = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise AuthConfigError(f"the API keys file {path} must hold {{'keys': [...]}}")
    keys = []
    for i, entry in enumerate(entries, start=1):
        where = f"{path} key {i}"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise AuthConfigError(f"{where}: each key needs a 'name'")
        if "key" in entry:
            raise AuthConfigError(
                f"{where} ({entry['name']}): the file stores hashes only ('sha256'), "
                "never the key itself; recreate it with `swapserve keys create`"
            )
        digest = entry.get("sha256")
        if not isinstance(digest, str) or len(digest) != 64 or not _is_hex(digest):
            raise AuthConfigError(f"{where} ({entry['name']}): 'sha256' must be 64 hex digits")
        keys.append(
            ApiKey(
                name=entry["name"],
                sha256=digest.lower(),
                scopes=_scopes(entry.get("scopes"), where),
                models=_names(entry.get("models"), "models", where),
                collections=_names(entry.get("collections"), "collections", where),
            )
        )
    return keys


def _is_hex(text: str) -> bool:
    try:
        int(text, 16)
    except ValueError:
        return False
    return True


def keys_file_path(settings: Settings) -> Path | None:
    """The keys file in use: the configured one, or `<data_dir>/api_keys.json` if present."""
    if settings.api_keys_file is not None:
        return settings.api_keys_file
    default = settings.data_dir / KEYS_FILE_NAME
    return default if default.exists() else None


def default_keys_file() -> Path:
    """The keys file a server started from this environment reads (for the CLI).

    Read from the environment, not from Settings: building Settings refuses a public host
    without keys, and creating the first key must not need one.
    """
    configured = os.environ.get("SWAPSERVE_API_KEYS_FILE")
    if configured:
        return Path(configured)
    data_dir = os.environ.get("SWAPSERVE_DATA_DIR")
    root = Path(data_dir) if data_dir else Path.home() / ".local" / "share" / "swapserve"
    return root / KEYS_FILE_NAME


def configured_keys(settings: Settings) -> list[ApiKey]:
    """Every key the settings name; raises AuthConfigError for anything unusable."""
    keys = parse_api_keys(settings.api_keys.get_secret_value()) if settings.api_keys else []
    path = keys_file_path(settings)
    if path is not None:
        keys += load_keys_file(path)
    _check_unique(keys)
    return keys


def _check_unique(keys: list[ApiKey]) -> None:
    # names identify keys in logs and own the rate-limit buckets: they must be unique
    seen: set[str] = set()
    for key in keys:
        if key.name in seen:
            raise AuthConfigError(f"two API keys are named {key.name!r}: names must be unique")
        seen.add(key.name)


def add_key_to_file(
    path: Path,
    name: str,
    scopes: Iterable[str],
    models: list[str] | None = None,
    collections: list[str] | None = None,
) -> str:
    """Create a key, store its hash in the keys file, and return the key (shown once)."""
    scope_set = _scopes(list(scopes), "--scope")
    existing: dict[str, Any] = {"keys": []}
    if path.exists():
        load_keys_file(path)  # refuse to append to a file the server could not read
        existing = json.loads(path.read_text())
    if any(k.get("name") == name for k in existing["keys"]):
        raise AuthConfigError(f"a key named {name!r} already exists in {path}")
    key = new_key()
    entry: dict[str, Any] = {
        "name": name,
        "sha256": hash_key(key),
        "scopes": sorted(scope_set),
        "created": int(time.time()),
    }
    if models is not None:
        entry["models"] = models
    if collections is not None:
        entry["collections"] = collections
    existing["keys"].append(entry)
    # a server reloading the file never reads half of it; only the owner reads the hashes
    write_json_atomic(path, existing, indent=2, mode=0o600)
    return key


class KeyStore:
    """The keys, looked up in constant time; the keys file is re-read when it changes."""

    def __init__(self, keys: list[ApiKey], file: Path | None = None, env_keys: int = 0):
        self._keys = list(keys)
        self._file = file
        self._env = self._keys[:env_keys]  # keys from SWAPSERVE_API_KEYS survive reloads
        self._mtime = self._stat()
        self._lock = threading.Lock()

    @property
    def keys(self) -> list[ApiKey]:
        return list(self._keys)

    def _stat(self) -> float | None:
        try:
            return self._file.stat().st_mtime_ns if self._file else None
        except OSError:
            return None

    def _maybe_reload(self) -> None:
        mtime = self._stat()
        if mtime == self._mtime:
            return
        with self._lock:
            if mtime == self._mtime:
                return
            try:
                loaded = load_keys_file(self._file) if self._file and mtime else []
                _check_unique(self._env + loaded)
            except AuthConfigError as exc:
                # keep serving with the keys we had rather than lock everyone out
                logger.error("API keys file not reloaded: %s", exc)
            else:
                self._keys = self._env + loaded
                logger.info("API keys file reloaded: %d keys", len(self._keys))
            self._mtime = mtime

    def authenticate(self, token: str) -> ApiKey | None:
        self._maybe_reload()
        digest = hash_key(token)
        found = None
        # compare against every key, in constant time, so timing says nothing
        for key in self._keys:
            if hmac.compare_digest(digest, key.sha256):
                found = key
        return found


class TokenBucket:
    """`per_minute` requests a minute, bursts of up to `per_minute`."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic):
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0  # tokens per second
        self.tokens = self.capacity
        self.clock = clock
        self.updated = clock()

    def take(self) -> float:
        """0 if a token was taken, else the seconds until one will be there."""
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class Limits:
    """Per-key requests a minute and concurrent streams; 0 = unlimited."""

    def __init__(
        self,
        requests_per_minute: int = 0,
        max_streams: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.requests_per_minute = requests_per_minute
        self.max_streams = max_streams
        self.clock = clock
        self.buckets: dict[str, TokenBucket] = {}
        self.streams: dict[str, int] = {}

    def check_rate(self, name: str) -> None:
        if not self.requests_per_minute:
            return
        bucket = self.buckets.get(name)
        if bucket is None:
            bucket = self.buckets[name] = TokenBucket(self.requests_per_minute, self.clock)
        wait = bucket.take()
        if wait > 0:
            logger.info("rate limit hit by key %s", name)
            raise APIError(
                429,
                f"Rate limit reached for key '{name}': {self.requests_per_minute} requests "
                f"per minute. Retry in {math.ceil(wait)} s.",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )

    def open_stream(self, name: str) -> bool:
        # runs on the event loop without awaiting: check-and-increment cannot interleave
        if self.max_streams and self.streams.get(name, 0) >= self.max_streams:
            return False
        self.streams[name] = self.streams.get(name, 0) + 1
        return True

    def close_stream(self, name: str) -> None:
        left = self.streams.get(name, 0) - 1
        if left > 0:
            self.streams[name] = left
        else:
            self.streams.pop(name, None)


@dataclass
class _Principal:
    """Who a request is: written by the scope dependency, read by StreamLimitMiddleware."""

    name: str | None = None


_PRINCIPAL = "swapserve.principal"


@dataclass
class Auth:
    """What the scope dependencies need; one per app, on `app.state.auth`."""

    store: KeyStore
    enabled: bool  # fixed at start-up: emptying the keys file never opens the server
    limits: Limits = field(default_factory=Limits)

    @classmethod
    def from_settings(cls, settings: Settings) -> Auth:
        env = parse_api_keys(settings.api_keys.get_secret_value()) if settings.api_keys else []
        keys = configured_keys(settings)
        file = settings.api_keys_file or settings.data_dir / KEYS_FILE_NAME
        return cls(
            store=KeyStore(keys, file, env_keys=len(env)),
            enabled=bool(keys),
            limits=Limits(settings.rate_limit_rpm, settings.max_streams_per_key),
        )

    def check(self, request: Request, scope: str) -> ApiKey | None:
        if scope == PUBLIC:
            return None
        key = None
        if self.enabled:
            key = self._authenticate(request, scope)
        name = key.name if key else ANONYMOUS
        self.limits.check_rate(name)
        principal = request.scope.get(_PRINCIPAL)
        if isinstance(principal, _Principal):
            principal.name = name
        _current_key.set(key)
        return key

    def _authenticate(self, request: Request, scope: str) -> ApiKey:
        where = f"{request.method} {request.url.path}"
        token = _bearer_token(request.headers.get("authorization"))
        if token is None:
            raise APIError(
                401,
                "Missing API key: send it as `Authorization: Bearer <key>`.",
                code="missing_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        key = self.store.authenticate(token)
        if key is None:
            client = request.client.host if request.client else "-"
            logger.warning("unknown API key on %s from %s", where, client)
            raise APIError(
                401,
                "Incorrect API key provided.",
                code="invalid_api_key",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        if not key.has_scope(scope):
            logger.warning("key %s lacks scope %s for %s", key.name, scope, where)
            raise APIError(
                403,
                f"The API key '{key.name}' lacks the '{scope}' scope needed for {where}.",
                code="insufficient_scope",
                headers={"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{scope}"'},
            )
        return key


def _bearer_token(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class ScopeGuard:
    """The dependency `require_scope` returns; its `scope` says what the route needs."""

    def __init__(self, scope: str):
        if scope not in (*SCOPES, PUBLIC):
            raise ValueError(f"unknown scope {scope!r}; use one of {[*SCOPES, PUBLIC]}")
        self.scope = scope

    async def __call__(self, request: Request) -> ApiKey | None:
        # async on purpose: the context variable set here must be seen by the route
        auth: Auth | None = getattr(request.app.state, "auth", None)
        if auth is None:
            raise APIError(500, "authentication is not set up", code="auth_not_configured")
        return auth.check(request, self.scope)

    def __repr__(self) -> str:
        return f"require_scope({self.scope!r})"


def require_scope(scope: str) -> ScopeGuard:
    """A dependency for `include_router(..., dependencies=[Depends(require_scope(...))])`."""
    return ScopeGuard(scope)


@dataclass(frozen=True)
class RouteScope:
    path: str
    methods: frozenset[str]
    scopes: frozenset[str] | None  # None: not a FastAPI route (the docs), so no dependencies


def route_scopes(app: FastAPI) -> list[RouteScope]:
    """Every route of the app with the scopes its dependencies (router-level ones included)
    require: what the tests check so that no mounted route goes without a scope."""
    try:
        # FastAPI >= 0.16x includes routers lazily: app.routes holds the routers, and the
        # routes with their include-time dependencies are reached through this iterator
        from fastapi.routing import iter_route_contexts

        routes: Iterable[Any] = iter_route_contexts(app.routes)
    except ImportError:
        routes = app.routes
    table = []
    for route in routes:
        dependant = getattr(route, "dependant", None)
        methods = frozenset(getattr(route, "methods", None) or ())
        scopes = None if dependant is None else frozenset(_scopes_of(dependant))
        table.append(RouteScope(str(getattr(route, "path", route)), methods, scopes))
    return table


def _scopes_of(dependant: Dependant) -> Iterable[str]:
    for sub in dependant.dependencies:
        if isinstance(sub.call, ScopeGuard):
            yield sub.call.scope
        yield from _scopes_of(sub)


def current_key() -> ApiKey | None:
    """The key of the request being served; None when the server has no keys."""
    return _current_key.get()


def require_collection(collection: str) -> None:
    """For RAG routes: 404, as for a collection that does not exist, outside the allow-list."""
    key = current_key()
    if key is not None and not key.allows_collection(collection):
        raise APIError(
            404,
            f"The collection `{collection}` does not exist.",
            param="collection",
            code="collection_not_found",
        )


class StreamLimitMiddleware:
    """429 for a streamed response when its key already holds `max_streams` streams.

    A stream is only known to be one when its response starts (the route decides from the
    body), and it ends when the response ends, so the count lives here, not in a
    dependency. Refusing at the start of the response is early enough: the SSE body
    generator has not run, so nothing was queued on the engine.
    """

    def __init__(self, app: ASGIApp, limits: Limits):
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.limits.max_streams:
            await self.app(scope, receive, send)
            return
        principal = _Principal()
        scope[_PRINCIPAL] = principal
        holder: str | None = None
        refused = False

        async def guarded_send(message: Message) -> None:
            nonlocal holder, refused
            if (
                message["type"] == "http.response.start"
                and principal.name is not None
                and _is_event_stream(message)
            ):
                if not self.limits.open_stream(principal.name):
                    refused = True
                    await _send_stream_refusal(send, principal.name, self.limits.max_streams)
                    raise _StreamRefused()
                holder = principal.name
            await send(message)

        try:
            await self.app(scope, receive, guarded_send)
        except Exception as exc:
            if not (refused and _caused_by_refusal(exc)):
                raise
        finally:
            if holder is not None:
                self.limits.close_stream(holder)


class _StreamRefused(Exception):
    pass


def _caused_by_refusal(exc: BaseException) -> bool:
    # anyio task groups (StreamingResponse) may wrap it in an exception group
    if isinstance(exc, _StreamRefused):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return all(_caused_by_refusal(e) for e in exc.exceptions)
    return False


def _is_event_stream(message: Message) -> bool:
    for name, value in message.get("headers", []):
        if name.lower() == b"content-type":
            return value.startswith(b"text/event-stream")
    return False


async def _send_stream_refusal(send: Send, name: str, limit: int) -> None:
    body = json.dumps(
        error_body(
            429,
            f"Key '{name}' already has {limit} streams open, the most allowed; "
            "retry when one ends.",
            None,
            "too_many_streams",
        )
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 429,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", b"1"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
