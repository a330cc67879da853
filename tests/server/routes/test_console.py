"""The web console (/ui) in headless Chromium against the real server: a chat streams into
the page, a bad adapter shows the server's error and changes nothing, a training job's
progress moves without a reload, a search shows hits, an experiment's chart renders, and
an `inference` key sees no admin controls while the admin routes still answer it 403.

Needs Playwright for Python and a Chromium (Debian's `chromium` package; .ci/run installs
both): skipped with the reason when either is missing. Screenshots of every page go to
$SWAPSERVE_SCREENSHOT_DIR (default tests/screenshots/latest, CI's artifact folder).
With SWAPSERVE_CONSOLE_MODEL=bundled the same run uses the bundled model and the real
embedder (what the README's screenshots in tests/screenshots/ come from; minutes).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.rag.fake_embedder import FakeEmbedder
from tests.support import LiveServer, start_live_server
from tests.tiny_model import build_lora_adapter
from tests.trainer.helpers import QA, house

playwright_api = pytest.importorskip(
    "playwright.sync_api", reason="Playwright for Python is not installed (pip install playwright)"
)

ROOT = Path(__file__).resolve().parents[3]
CHROMIUM = os.environ.get("SWAPSERVE_CHROMIUM") or next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
)
if CHROMIUM is None:
    pytest.skip(
        "no Chromium found (apt-get install chromium, or set SWAPSERVE_CHROMIUM)",
        allow_module_level=True,
    )

BUNDLED = os.environ.get("SWAPSERVE_CONSOLE_MODEL") == "bundled"
# training the bundled model on a busy CPU takes more than the suite's 10 minutes
pytestmark = pytest.mark.timeout(2400 if BUNDLED else 600)
SHOTS = Path(
    os.environ.get("SWAPSERVE_SCREENSHOT_DIR") or ROOT / "tests" / "screenshots" / "latest"
)
ADMIN_KEY = "ss-console-admin-5c2d8e1f7a9b3046"
INFER_KEY = "ss-console-infer-8e4a1c6b2d9f0735"
TIMEOUT_MS = (600 if BUNDLED else 60) * 1000
TRAIN_CONFIG = {"r": 4, "max_length": 128, "eval_fraction": 0.0, "device": "cpu"}
NOTES = {
    "zorblax.md": "The Zorblax-7 reactor runs on frozen lemonade. It was built in 2091.",
    "ferry.md": "The Marrowick ferry leaves the harbour at noon and takes 55 minutes.",
    "owls.md": "Snow owls on the island hunt at dusk and nest in the old lighthouse.",
}


def admin_headers(key: str = ADMIN_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def server(tiny_model_path, tmp_path_factory) -> Iterator[LiveServer]:
    data = tmp_path_factory.mktemp("console-data")
    keys = json.dumps(
        [
            {"key": ADMIN_KEY, "name": "ops", "scopes": ["admin"]},
            {"key": INFER_KEY, "name": "app", "scopes": ["inference"]},
        ]
    )
    with pytest.MonkeyPatch.context() as mp:
        settings: dict = {"data_dir": data, "api_keys": keys, "max_model_len": 1024}
        if not BUNDLED:
            mp.setattr("server.retrieval.get_embedder", lambda path=None: FakeEmbedder())
            settings |= {"base_model": str(tiny_model_path), "quantization": "none"}
        if BUNDLED:  # loading the real model on a busy machine takes longer than the default
            from server.app import create_app
            from server.config import Settings
            from tests.support import free_port

            port = free_port()
            server = LiveServer(create_app(Settings(port=port, **settings)), port)
            server.start(timeout_s=1200)
        else:
            server = start_live_server(**settings)
        server.data_dir = data  # type: ignore[attr-defined]
        server.tiny_model_path = tiny_model_path  # type: ignore[attr-defined]
        _wait_ready(server)
        # a collection to search, and an adapter to compare with the base
        h = admin_headers()
        httpx.post(f"{server.url}/rag/collections", json={"name": "notes"}, headers=h, timeout=600)
        files = [("files", (n, t.encode(), "text/markdown")) for n, t in NOTES.items()]
        r = httpx.post(
            f"{server.url}/rag/collections/notes/documents", files=files, headers=h, timeout=900
        )
        assert r.status_code == 200, r.text
        if not BUNDLED:
            adapter = build_lora_adapter(tiny_model_path, data.parent / "demo-adapter")
            r = httpx.post(
                f"{server.url}/adapters", json={"name": "demo", "path": str(adapter)}, headers=h
            )
            assert r.status_code == 201, r.text
        yield server
        server.stop()


def _wait_ready(server: LiveServer) -> None:

    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if httpx.get(f"{server.url}/ready", timeout=10).status_code == 200:
            return
        time.sleep(0.5)
    raise TimeoutError("server not ready")


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def open_console(browser, server, key: str):
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    # the page's own errors show in the test's output when it fails
    page.on("console", lambda m: print(f"console {m.type}: {m.text}"))
    page.on("pageerror", lambda e: print(f"page error: {e}"))
    page.goto(f"{server.url}/ui")
    page.fill("#key-input", key)
    page.click("#key-form button[type=submit]")
    page.wait_for_selector("#pg-prompt")
    return page


@pytest.fixture(scope="module")
def admin(browser, server):
    page = open_console(browser, server, ADMIN_KEY)
    yield page
    page.context.close()


def go(page, where: str, ready: str) -> None:
    page.evaluate(f"location.hash = {where!r}")
    page.wait_for_selector(ready)


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def test_console_is_served_offline_without_a_key(server):
    """The files are open (they hold no data) and reference nothing outside the server."""
    for name in ("", "/app.js", "/charts.js", "/console.css"):
        r = httpx.get(f"{server.url}/ui{name}")
        assert r.status_code == 200, name
        text = r.text.replace("http://www.w3.org/2000/svg", "")  # a namespace, not a fetch
        assert "http://" not in text and "https://" not in text, name
    assert httpx.get(f"{server.url}/ui/nothing.js").status_code == 404
    assert httpx.get(f"{server.url}/auth/session").status_code == 401


def ask(page, models: list[str], question: str) -> list:
    """Send one prompt to `models` side by side, with the notes collection; return the
    answer columns once every one has finished."""
    go(page, "#playground", "#pg-prompt")
    for box in page.query_selector_all("#pg-models input"):
        if (box.get_attribute("value") in models) != box.is_checked():
            box.click()
    page.fill("#pg-collection", "notes")
    page.fill("#pg-topk", "1" if not BUNDLED else "2")  # the tiny model's context is 512
    page.fill("#pg-max-tokens", "16" if not BUNDLED else "32")
    page.fill("#pg-prompt", question)
    # count how many times the answers' text changes: a stream updates it chunk by chunk
    page.evaluate(
        """() => {
        window.updates = 0;
        new MutationObserver((ms) => { for (const m of ms)
            if (m.target.closest && m.target.closest('.turn.assistant') ||
                m.target.parentElement && m.target.parentElement.closest('.turn.assistant'))
                window.updates++; })
          .observe(document.querySelector('#pg-answers'),
                   {subtree: true, childList: true, characterData: true});
    }"""
    )
    page.click("#pg-send")
    # every column has finished: its meta line (finish reason, usage) or an error
    page.wait_for_function(
        f"document.querySelectorAll('#pg-answers .answer').length == {len(models)} && "
        "[...document.querySelectorAll('#pg-answers .answer')].every(c => "
        "c.querySelector('.meta').textContent || c.querySelector('.error').textContent)"
    )
    errors = [e.inner_text() for e in page.query_selector_all("#pg-answers .error")]
    assert not any(errors), errors
    columns = page.query_selector_all("#pg-answers .answer")
    assert [c.get_attribute("data-model") for c in columns] == models
    return columns


def test_chat_streams_side_by_side_with_citations(admin, server):
    page = admin
    # the models a chat can go to: /v1/models lists the embedder too, which cannot chat
    listed = httpx.get(f"{server.url}/v1/models", headers=admin_headers()).json()["data"]
    assert any(m["task"] == "embed" for m in listed)
    go(page, "#playground", "#pg-models input")
    offered = [b.get_attribute("value") for b in page.query_selector_all("#pg-models input")]
    assert offered == [m["id"] for m in listed if m["task"] == "generate"]
    models = ["base"] if BUNDLED else ["base", "demo"]
    columns = ask(page, models, "What does the Zorblax-7 reactor run on?")
    for col in columns:
        assert col.query_selector(".turn.assistant").inner_text().strip()
        assert "zorblax.md" in col.query_selector(".citations").inner_text()
    assert page.evaluate("window.updates") > 2
    shot(page, "playground")


def test_bad_adapter_shows_its_error_and_changes_nothing(admin, server, tmp_path):
    page = admin
    go(page, "#adapters", "#reg-submit")
    before = page.inner_text("#adapter-rows")
    not_an_adapter = tmp_path / "empty-folder"
    not_an_adapter.mkdir()
    page.fill("#reg-name", "broken")
    page.fill("#reg-path", str(not_an_adapter))
    page.click("#reg-submit")
    page.wait_for_selector("#adapter-error:not(:empty)")
    assert "invalid_config" in page.inner_text("#adapter-error")
    # an upload that is not an archive: the server's words again
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"this is not a tar file")
    page.set_input_files(".drop input[type=file]", str(junk))
    page.click("#reg-submit")
    page.wait_for_function(
        "document.querySelector('#adapter-error').textContent.includes('invalid_archive')"
    )
    assert page.inner_text("#adapter-rows") == before
    names = [
        a["name"]
        for a in httpx.get(f"{server.url}/adapters", headers=admin_headers()).json()["data"]
    ]
    assert "broken" not in names
    shot(page, "adapters")
    if BUNDLED:
        return
    # typing a path drops the picked archive: a good folder registers by path
    good = build_lora_adapter(server.tiny_model_path, tmp_path / "good-adapter")
    page.fill("#reg-name", "demo2")
    page.fill("#reg-path", str(good))
    assert page.inner_text("#reg-file") == ""
    page.click("#reg-submit")
    page.wait_for_function("document.querySelector('#reg-result').textContent.includes('demo2')")
    assert page.inner_text("#adapter-error") == ""
    page.wait_for_selector("#adapter-rows tr[data-name=demo2]")
    # an error on screen, then a delete: the delete clears it and the row goes
    page.set_input_files(".drop input[type=file]", str(junk))
    assert page.input_value("#reg-path") == ""
    page.click("#reg-submit")
    page.wait_for_selector("#adapter-error:not(:empty)")
    page.once("dialog", lambda d: d.accept())
    page.click("#adapter-rows tr[data-name=demo2] button.danger")
    page.wait_for_selector("#adapter-rows tr[data-name=demo2]", state="detached")
    assert page.inner_text("#adapter-error") == ""
    assert page.inner_text("#adapter-rows") == before


def test_training_progress_updates_without_a_reload(admin, server, tmp_path):
    page = admin
    go(page, "#training", "#train-dry")
    data = tmp_path / "house.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": house(a)}]}
        for q, a in QA
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    page.set_input_files(".drop input[type=file]", str(data))
    page.fill("#train-name", "console-sft")
    page.fill("#train-max-steps", "3" if not BUNDLED else "2")
    page.fill("#train-lr", "1e-2" if not BUNDLED else "2e-4")
    page.fill("#train-r", "4")
    page.fill("#train-batch", "4" if not BUNDLED else "2")
    # an eval split measured at every step: the chart's second series
    page.fill("#train-eval", "0.25")
    extra = {k: TRAIN_CONFIG[k] for k in ("max_length", "device")}
    extra.update(eval_steps=1, early_stopping_patience=0, eval_max_examples=1)
    page.fill("#train-extra", json.dumps({**extra, "eval_max_new_tokens": 2}))
    page.click("#train-dry")
    page.wait_for_selector("#train-mask .loss")
    assert "carry loss" in page.inner_text("#train-preview")
    page.evaluate("window.noReload = true")
    page.click("#train-start")
    page.wait_for_selector("#job-status")
    steps = set()
    deadline = time.monotonic() + TIMEOUT_MS / 1000  # a busy CPU loads the worker slowly
    while time.monotonic() < deadline:
        text = page.inner_text("#job-status")
        steps.add(text.split(" step ")[1].split(" ")[0] if " step " in text else "")
        if page.query_selector("#try-adapter") or "failed" in text:
            break
        page.wait_for_timeout(250)
    assert page.evaluate("window.noReload") is True  # the same page, updated in place
    assert len(steps) >= 2, steps  # the step counter moved while we watched
    page.wait_for_selector("#try-adapter")
    # train and eval loss, two lines with a legend
    assert len(page.query_selector_all("#loss-chart svg path.series")) == 2
    assert "eval loss" in page.text_content("#loss-chart svg .legend")
    assert "console-sft" in page.inner_text("#card-facts") or page.inner_text("#card-facts")
    shot(page, "training")
    page.click("#try-adapter")
    page.wait_for_selector("#pg-prompt")
    checked = [
        b.get_attribute("value") for b in page.query_selector_all("#pg-models input:checked")
    ]
    assert checked == ["console-sft"]
    # the new adapter beside the base, on the same question: the playground's screenshot
    ask(page, ["base", "console-sft"], "When does the Marrowick ferry leave?")
    shot(page, "playground")


def test_search_shows_hits(admin):
    page = admin
    go(page, "#knowledge?c=notes", "#kb-search")
    page.fill("#kb-query", "what does the reactor run on")
    page.click("#kb-search")
    page.wait_for_selector("#kb-hits li .score")
    assert "zorblax.md" in page.inner_text("#kb-hits li")
    assert float(page.inner_text("#kb-hits li .score")) > 0
    assert "ferry.md" in page.inner_text("#kb-docs")
    shot(page, "knowledge")


def test_collection_counts_follow_upload_and_delete(admin, tmp_path):
    page = admin
    go(page, "#knowledge?c=notes", "#kb-rows tr[data-collection=notes]")

    def documents() -> int:
        return int(page.inner_text("#kb-rows tr[data-collection=notes] td:nth-child(2)"))

    before = documents()
    extra = tmp_path / "lighthouse.md"
    extra.write_text("The old lighthouse on the island was lit for the last time in 1962.")
    page.set_input_files(".drop input[type=file]", str(extra))
    page.wait_for_function(
        "document.querySelector('#kb-upload-result').textContent.startsWith('added 1')"
    )
    # the table's counts follow the upload without a reload
    page.wait_for_function(
        "document.querySelector('#kb-rows tr[data-collection=notes] td:nth-child(2)')"
        f".textContent == '{before + 1}'"
    )
    page.click("#kb-docs tr:has-text('lighthouse.md') button.danger")
    page.wait_for_function(
        "!document.querySelector('#kb-docs').textContent.includes('lighthouse.md')"
    )
    page.wait_for_function(
        "document.querySelector('#kb-rows tr[data-collection=notes] td:nth-child(2)')"
        f".textContent == '{before}'"
    )
    assert documents() == before


def test_experiment_chart_renders(admin, tmp_path):
    page = admin
    go(page, "#experiments", "#exp-start")
    questions = tmp_path / "q.jsonl"
    rows = [
        {
            "question": "What does the Zorblax-7 reactor run on?",
            "references": ["frozen lemonade"],
            "doc_id": "zorblax.md",
        },
        {"question": "When does the ferry leave?", "references": ["at noon"], "doc_id": "ferry.md"},
    ]
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    page.set_input_files(".drop input[type=file]", str(questions))
    page.wait_for_function(
        "document.querySelector('#exp-file').textContent.includes('2 questions')"
    )
    page.fill("#exp-max-tokens", "4" if not BUNDLED else "16")
    page.fill("#exp-topk", "1" if not BUNDLED else "2")
    page.click("#exp-start")
    try:
        page.wait_for_selector("#exp-charts svg")
    finally:
        shot(page, "experiments")
    assert len(page.query_selector_all("#exp-charts svg rect")) >= 4  # bars and legends
    assert len(page.query_selector_all("#exp-charts svg")) >= 1
    assert "[" in page.inner_text("#exp-summary")  # intervals


def test_split_feedback_exports_download(admin, server):
    """A split's traffic and feedback counts, and its exports (DPO pairs, KTO) downloaded
    from the page as JSONL."""
    page = admin
    h = admin_headers()
    arms = [{"name": "a", "model": "base"}, {"name": "b", "model": "base" if BUNDLED else "demo"}]
    r = httpx.post(f"{server.url}/ab/splits", json={"name": "sp", "arms": arms}, headers=h)
    assert r.status_code == 201, r.text
    for i, user in enumerate(["u1", "u2", "u3", "u4", "u5", "u6"]):
        r = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={
                "model": "ab:sp",
                "user": user,
                "max_tokens": 4,
                "messages": [{"role": "user", "content": "Say hi"}],
            },
            headers=h,
            timeout=300,
        )
        assert r.status_code == 200, r.text
        fb = {"response_id": r.json()["id"], "rating": 1 if i % 2 else -1}
        assert httpx.post(f"{server.url}/ab/feedback", json=fb, headers=h).status_code == 200
    go(page, "#experiments", "#split-rows")
    page.wait_for_function("document.querySelector('#split-rows').textContent.includes('sp')")
    assert "feedback" in page.inner_text("#split-rows")
    buttons = page.query_selector_all("#split-rows button")
    assert {b.inner_text() for b in buttons} >= {"DPO pairs", "KTO"}
    for button in buttons:
        with page.expect_download() as download:
            button.click()
        lines = Path(download.value.path()).read_text().splitlines()
        rows = [json.loads(line) for line in lines]
        assert rows, button.inner_text()
        key = "chosen" if button.inner_text() == "DPO pairs" else "label"
        assert all(key in row for row in rows), rows


def test_server_page(admin):
    page = admin
    go(page, "#server", "#ready-facts")
    assert "status" in page.inner_text("#ready-facts")
    page.wait_for_selector("#tps-chart svg")
    shot(page, "server")


def test_inference_key_is_read_only(browser, server):
    page = open_console(browser, server, INFER_KEY)
    try:
        assert "read-only" in page.inner_text("#who-text")
        go(page, "#adapters", "#adapter-rows")
        assert not page.is_visible("#reg-submit")
        assert not any(b.is_visible() for b in page.query_selector_all("button.danger"))
        go(page, "#training", "main section")
        assert page.query_selector("#train-start") is None
        assert "admin key" in page.inner_text("main")
        go(page, "#knowledge?c=notes", "#kb-search")
        assert not page.is_visible(".admin-only")
        shot(page, "read-only")
    finally:
        page.context.close()
    # the page hides them; the server refuses them
    h = admin_headers(INFER_KEY)
    for method, path in (("GET", "/adapters"), ("POST", "/train/sft"), ("GET", "/rag/collections")):
        r = httpx.request(method, f"{server.url}{path}", headers=h, json={})
        assert r.status_code == 403, (method, path, r.text)
    assert httpx.get(f"{server.url}/auth/session", headers=h).json()["admin"] is False
