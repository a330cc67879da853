"""server/auth.py without a server: key parsing, hashing, scopes, refusals, limits, the CLI."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat

import pytest
from pydantic import ValidationError

from server.auth import (
    ADMIN,
    INFERENCE,
    PUBLIC,
    ApiKey,
    AuthConfigError,
    KeyStore,
    Limits,
    TokenBucket,
    add_key_to_file,
    check_secret,
    configured_keys,
    hash_key,
    load_keys_file,
    new_key,
    parse_api_keys,
    require_scope,
)
from server.config import Settings
from server.errors import APIError

K1 = "ss-k1-9f8e7d6c5b4a39281706"
K2 = "ss-k2-0a1b2c3d4e5f60718293"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- parsing -------------------------------------------------------------------------------


def test_parse_key_scope_pairs():
    keys = parse_api_keys(f"{K1}:admin, {K2}:inference")
    assert [k.name for k in keys] == ["env-1", "env-2"]
    assert keys[0].scopes == {ADMIN} and keys[1].scopes == {INFERENCE}
    assert keys[0].sha256 == hashlib.sha256(K1.encode()).hexdigest()
    assert keys[0].models is None


def test_parse_bare_key_defaults_to_least_privilege():
    (key,) = parse_api_keys(K1)
    assert key.scopes == {INFERENCE}


def test_parse_json_list_with_names_and_allow_lists():
    text = json.dumps(
        [
            f"{K1}:admin",
            {"key": K2, "name": "tenant-a", "scopes": ["inference"], "models": ["a0"]},
        ]
    )
    admin, tenant = parse_api_keys(text)
    assert admin.scopes == {ADMIN}
    assert tenant.name == "tenant-a"
    assert tenant.models == {"a0"}
    assert tenant.allows_model("a0") and not tenant.allows_model("a1")
    assert tenant.collections is None and tenant.allows_collection("anything")


@pytest.mark.parametrize(
    "text, match",
    [
        (f"{K1}:root", "unknown scope 'root'"),
        ("[not json", "not valid JSON"),
        (json.dumps([{"name": "x"}]), "object with a 'key'"),
        (json.dumps([{"key": K1, "models": "a0"}]), "models must be a list"),
    ],
)
def test_parse_refuses_bad_entries(text, match):
    with pytest.raises(AuthConfigError, match=match):
        parse_api_keys(text)


@pytest.mark.parametrize(
    "key",
    [
        "changeme",
        "secret",
        "short-key-123",  # 13 characters
        "changeme-changeme-changeme",
        "my-super-secret-api-key-value",
        "aaaaaaaaaaaaaaaaaaaaaaaa",
    ],
)
def test_placeholder_and_short_keys_are_refused(key):
    with pytest.raises(AuthConfigError) as info:
        check_secret(key, "test")
    assert key not in str(info.value)  # messages never echo a key
    with pytest.raises(ValidationError) as settings_error:
        Settings(api_keys=f"{key}:admin")
    assert key not in str(settings_error.value)


def test_generated_keys_pass_the_checks_and_differ():
    keys = {new_key() for _ in range(50)}
    assert len(keys) == 50
    for key in keys:
        check_secret(key, "test")
        assert key.startswith("ss-") and len(key) >= 40


# --- scopes --------------------------------------------------------------------------------


def test_admin_implies_inference_but_not_the_reverse():
    admin = ApiKey("a", hash_key(K1), frozenset({ADMIN}))
    inference = ApiKey("i", hash_key(K2), frozenset({INFERENCE}))
    assert admin.has_scope(ADMIN) and admin.has_scope(INFERENCE)
    assert inference.has_scope(INFERENCE) and not inference.has_scope(ADMIN)
    assert inference.has_scope(PUBLIC)


def test_require_scope_refuses_unknown_scope():
    assert require_scope(ADMIN).scope == ADMIN
    with pytest.raises(ValueError, match="unknown scope"):
        require_scope("superuser")


# --- the keys file and the key store ----------------------------------------------------------


def test_add_key_to_file_stores_only_the_hash(tmp_path):
    path = tmp_path / "keys" / "api_keys.json"
    key = add_key_to_file(path, "ci", [INFERENCE], models=["a0"])
    text = path.read_text()
    assert key not in text
    assert hash_key(key) in text
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    (loaded,) = load_keys_file(path)
    assert loaded.name == "ci" and loaded.scopes == {INFERENCE} and loaded.models == {"a0"}
    with pytest.raises(AuthConfigError, match="already exists"):
        add_key_to_file(path, "ci", [ADMIN])
    add_key_to_file(path, "ops", [ADMIN])
    assert [k.name for k in load_keys_file(path)] == ["ci", "ops"]


@pytest.mark.parametrize(
    "entry, match",
    [
        ({"name": "x", "key": K1, "scopes": ["admin"]}, "hashes only"),
        ({"name": "x", "sha256": "abc", "scopes": ["admin"]}, "64 hex digits"),
        ({"name": "x", "sha256": "z" * 64, "scopes": ["admin"]}, "64 hex digits"),
        ({"name": "x", "sha256": hash_key(K1), "scopes": []}, "non-empty list"),
        ({"sha256": hash_key(K1), "scopes": ["admin"]}, "needs a 'name'"),
    ],
)
def test_keys_file_refuses_bad_entries(tmp_path, entry, match):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [entry]}))
    with pytest.raises(AuthConfigError, match=match):
        load_keys_file(path)


def test_key_store_authenticates_by_hash_and_reloads_the_file(tmp_path):
    path = tmp_path / "keys.json"
    first = add_key_to_file(path, "first", [INFERENCE])
    env = parse_api_keys(f"{K1}:admin")
    store = KeyStore(env + load_keys_file(path), path, env_keys=len(env))
    found = store.authenticate(first)
    assert found is not None and found.name == "first"
    assert store.authenticate(K1).name == "env-1"
    assert store.authenticate(first + "x") is None
    assert store.authenticate("") is None
    second = add_key_to_file(path, "second", [ADMIN])
    os.utime(path, ns=(1, 10**18))  # a distinct mtime, whatever the file system's resolution
    assert store.authenticate(second).name == "second"
    assert store.authenticate(K1).name == "env-1"  # env keys survive a reload
    path.write_text("{broken")
    os.utime(path, ns=(1, 2 * 10**18))
    assert store.authenticate(second).name == "second"  # a bad file keeps the old keys


# --- settings ------------------------------------------------------------------------------


def test_non_loopback_without_keys_is_refused(tmp_path):
    with pytest.raises(ValidationError, match="SWAPSERVE_ALLOW_UNAUTHENTICATED"):
        Settings(host="0.0.0.0", data_dir=tmp_path)
    with pytest.raises(ValidationError, match="no API keys"):
        Settings(host="10.1.2.3", data_dir=tmp_path)
    assert Settings(host="0.0.0.0", data_dir=tmp_path, allow_unauthenticated=True)
    assert Settings(host="0.0.0.0", data_dir=tmp_path, api_keys=f"{K1}:admin")
    assert Settings(host="localhost", data_dir=tmp_path).binds_loopback


def test_keys_from_env_variables(monkeypatch, tmp_path):
    monkeypatch.setenv("SWAPSERVE_API_KEYS", f"{K1}:admin,{K2}:inference")
    monkeypatch.setenv("SWAPSERVE_HOST", "0.0.0.0")
    monkeypatch.setenv("SWAPSERVE_DATA_DIR", str(tmp_path))
    settings = Settings()
    assert K1 not in repr(settings)  # a SecretStr: settings can be logged
    assert [k.scopes for k in configured_keys(settings)] == [{ADMIN}, {INFERENCE}]


def test_keys_file_setting_and_default_location(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(ValidationError, match="cannot read the API keys file"):
        Settings(api_keys_file=missing, data_dir=tmp_path)
    # the default file in data_dir is picked up, so `keys create` + `serve` just works
    add_key_to_file(tmp_path / "api_keys.json", "ops", [ADMIN])
    settings = Settings(host="0.0.0.0", data_dir=tmp_path)
    assert [k.name for k in configured_keys(settings)] == ["ops"]


def test_duplicate_key_names_are_refused(tmp_path):
    add_key_to_file(tmp_path / "api_keys.json", "env-1", [ADMIN])
    with pytest.raises(ValidationError, match="names must be unique"):
        Settings(data_dir=tmp_path, api_keys=f"{K1}:admin")


def test_open_loopback_server_warns_at_start_up(tmp_path, caplog):
    from server.app import create_app

    with caplog.at_level(logging.WARNING, logger="server.app"):
        app = create_app(Settings(data_dir=tmp_path))
    assert not app.state.auth.enabled
    assert "open to anyone" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="server.app"):
        app = create_app(Settings(data_dir=tmp_path, api_keys=f"{K1}:admin"))
    assert app.state.auth.enabled
    assert "open to anyone" not in caplog.text


# --- limits --------------------------------------------------------------------------------


def test_token_bucket_refills_at_the_rate():
    clock = Clock()
    bucket = TokenBucket(3, clock)  # one token every 20 s, bursts of 3
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take() == pytest.approx(20.0)
    clock.now += 10
    assert bucket.take() == pytest.approx(10.0)
    clock.now += 10
    assert bucket.take() == 0.0
    clock.now += 3600  # a long pause refills to the burst size, not beyond
    assert [bucket.take() for _ in range(4)][-1] > 0


def test_rate_limit_is_per_key_with_retry_after():
    clock = Clock()
    limits = Limits(requests_per_minute=2, clock=clock)
    limits.check_rate("a")
    limits.check_rate("a")
    with pytest.raises(APIError) as info:
        limits.check_rate("a")
    assert info.value.status == 429 and info.value.code == "rate_limit_exceeded"
    assert info.value.headers == {"Retry-After": "30"}
    limits.check_rate("b")  # another key has its own bucket
    unlimited = Limits()
    for _ in range(1000):
        unlimited.check_rate("a")


def test_stream_slots_are_counted_per_key():
    limits = Limits(max_streams=2)
    assert limits.open_stream("a") and limits.open_stream("a")
    assert not limits.open_stream("a")
    assert limits.open_stream("b")
    limits.close_stream("a")
    assert limits.open_stream("a")
    limits.close_stream("a")
    limits.close_stream("a")
    assert "a" not in limits.streams


# --- the CLI -------------------------------------------------------------------------------


def test_cli_keys_create_prints_the_key_once(tmp_path, capsys, monkeypatch):
    from server.cli import main

    path = tmp_path / "keys.json"
    assert main(["keys", "create", "--name", "ops", "--scope", "admin", "--file", str(path)]) == 0
    key = capsys.readouterr().out.strip()
    (stored,) = load_keys_file(path)
    assert stored.sha256 == hash_key(key) and stored.scopes == {ADMIN}
    assert main(["keys", "create", "--name", "ops", "--scope", "admin", "--file", str(path)]) == 2
    assert "already exists" in capsys.readouterr().err
    # without --file: the file the server would read
    monkeypatch.setenv("SWAPSERVE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("SWAPSERVE_API_KEYS_FILE", raising=False)
    assert main(["keys", "create", "--name", "ci", "--scope", "inference", "--model", "a0"]) == 0
    key = capsys.readouterr().out.strip()
    settings = Settings(host="0.0.0.0")
    (ci,) = configured_keys(settings)
    assert ci.sha256 == hash_key(key) and ci.models == {"a0"}
