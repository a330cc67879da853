"""One adapter name registered, replaced and deleted from several clients at once, through
our routes and vLLM's aliases, while other clients generate with it.

Never a 5xx; every answer on the name is the greedy marker of weights the name may have
held while the request ran (never another's, never the base's); and afterwards the
registry, the files on disk and what the engine serves agree.
"""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.support import ServerProcess
from tests.tiny_model import build_lora_adapter

NAME = "hot"
WRITERS = 4
READERS = 4
SECONDS = 12
PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


def chat(url: str, model: str, *, stream: bool = False) -> tuple[int, str, str]:
    """(status, text, error code) of a greedy chat; a stream's in-band error counts as its
    status (400 for an adapter deleted while the request waited)."""
    body = {"model": model, "messages": PROMPT, "max_tokens": 8, "temperature": 0}
    if not stream:
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
        if r.status_code != 200:
            return r.status_code, "", r.json()["error"]["code"]
        return 200, r.json()["choices"][0]["message"]["content"] or "", ""
    parts = []
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=120
    ) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, "", r.json()["error"]["code"]
        for line in r.iter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            event = json.loads(line[5:])
            if "error" in event:
                status = 500 if event["error"]["type"] == "server_error" else 400
                return status, "", event["error"]["code"]
            for choice in event.get("choices") or []:
                parts.append((choice.get("delta") or {}).get("content") or "")
    return 200, "".join(parts), ""


@pytest.fixture(scope="module")
def setup(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("stress")
    variants = {
        f"w{i}": build_lora_adapter(tiny_model_path, root / f"w{i}", seed=20 + i) for i in range(3)
    }
    server = ServerProcess(tiny_model_path, root / "data", env={"SWAPSERVE_MAX_LORAS": "2"})
    server.start()
    url = server.url
    try:
        markers = {"base": chat(url, "base")[1]}
        for v, path in variants.items():
            r = httpx.post(f"{url}/adapters", json={"name": f"cal-{v}", "path": str(path)})
            assert r.status_code == 201, r.text
            markers[v] = chat(url, f"cal-{v}")[1]
            assert httpx.delete(f"{url}/adapters/cal-{v}").status_code == 200
        assert len(set(markers.values())) == len(markers), markers  # each tells itself apart
        yield {"url": url, "variants": variants, "markers": markers, "server": server}
    finally:
        server.stop()


def test_concurrent_register_replace_delete_of_one_name(setup):
    url, variants, markers = setup["url"], setup["variants"], setup["markers"]
    by_path = {str(p): v for v, p in variants.items()}
    ops: list[dict] = []  # writes: sent, acked, what they set (None: deleted), status
    answers: list[dict] = []
    stop = time.monotonic() + SECONDS
    lock = threading.Lock()

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=url, timeout=120) as c:
            while time.monotonic() < stop:
                v = rng.choice(sorted(variants))
                path = str(variants[v])
                kind = rng.choice(
                    ["register", "replace", "alias-replace", "delete", "alias-delete"]
                )
                sent = time.time()
                if kind == "register":
                    r = c.post("/adapters", json={"name": NAME, "path": path})
                elif kind == "replace":
                    r = c.post("/adapters", json={"name": NAME, "path": path, "replace": True})
                elif kind == "alias-replace":
                    body = {"lora_name": NAME, "lora_path": path, "load_inplace": True}
                    r = c.post("/v1/load_lora_adapter", json=body)
                elif kind == "delete":
                    r = c.delete(f"/adapters/{NAME}")
                else:
                    r = c.post("/v1/unload_lora_adapter", json={"lora_name": NAME})
                sets = None if "delete" in kind else v
                with lock:
                    ops.append({"sent": sent, "acked": time.time(), "sets": sets,
                                "status": r.status_code, "kind": kind, "body": r.text[:200]})  # fmt: skip
                time.sleep(rng.uniform(0, 0.05))

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < stop:
            t0 = time.time()
            status, text, code = chat(url, NAME, stream=rng.random() < 0.5)
            with lock:
                answers.append({"t0": t0, "t1": time.time(), "status": status, "text": text,
                                "code": code})  # fmt: skip

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(WRITERS)]
    threads += [threading.Thread(target=reader, args=(100 + i,)) for i in range(READERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(SECONDS + 180)

    # never a 5xx; the only refusals are the races' own (409 taken, 404 gone)
    assert all(o["status"] < 500 for o in ops), [o for o in ops if o["status"] >= 500][:3]
    assert {o["status"] for o in ops} <= {200, 201, 404, 409}, ops[:5]
    assert all(a["status"] < 500 for a in answers), [a for a in answers if a["status"] >= 500][:3]
    assert all(a["code"] in ("", "model_not_found", "adapter_not_found") for a in answers), {
        a["code"] for a in answers
    }
    done = [o for o in ops if o["status"] in (200, 201)]
    # the churn really ran (counts kept low: a busy CI machine makes every call slow)
    assert sum(o["sets"] is not None for o in done) > 3 and sum(o["sets"] is None for o in done) > 2

    def possible(t0: float, t1: float) -> set[str | None]:
        """What the name may have held during [t0, t1]: each acknowledged write whose effect
        had begun by t1 and was not surely overwritten (by a write sent after it was
        acknowledged and itself acknowledged) before t0."""
        return {
            o["sets"]
            for o in done
            if o["sent"] <= t1 and not any(x["sent"] > o["acked"] and x["acked"] < t0 for x in done)
        }

    served = [a for a in answers if a["status"] == 200]
    assert len(served) > 5
    wrong = []
    for a in served:
        allowed = possible(a["t0"], a["t1"]) - {None}
        if a["text"] not in {markers[v] for v in allowed}:
            source = [v for v, m in markers.items() if m == a["text"]]
            wrong.append({**a, "allowed": sorted(allowed), "is": source})
    assert not wrong, wrong[:3]

    # afterwards: registry, disk and engine agree
    listed = httpx.get(f"{url}/adapters").json()["data"]
    final = {a["name"]: by_path[a["source"]] for a in listed}
    last = possible(time.time(), time.time())
    assert final.get(NAME) in last, (final, last)
    if NAME in final:
        assert chat(url, NAME)[1] == markers[final[NAME]]
    else:
        assert chat(url, NAME)[0] == 404
    data = setup["server"].data_dir / "adapters"
    registry = json.loads((data / "registry.json").read_text())["adapters"]
    assert set(registry) == set(final)
    # replaced versions are removed once no request uses them; give that a moment
    deadline = time.monotonic() + 60
    while True:
        stored = {p.name for p in (data / "store").iterdir()}
        expected = {Path(r["path"]).name for r in registry.values()}
        if stored == expected or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert stored == expected
    assert not any((data / ".staging").iterdir())
