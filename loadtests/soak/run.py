"""The soak: a real server under locust, adapter churn, one SIGKILL mid-run, every answer
and every acknowledged write checked, and a CSV + HTML report.

    python -m loadtests.soak.run --duration 600 --users 8
    make soak DURATION=600 USERS=8

Bounded: locust stops after --duration seconds, the whole run has a hard deadline, and
every process it starts (server, locust, training workers) ends with it. Loopback only.
Exit status 1 when a goal is missed (the report says which).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from loadtests._adapters import linear_shapes_from_config, random_lora_adapter  # noqa: E402
from loadtests._server import free_port  # noqa: E402
from loadtests.soak.common import (  # noqa: E402
    MARKED_KINDS,
    RAG_COLLECTION,
    RAG_DOCUMENTS,
    SPLIT,
    answer_text,
    marked_body,
)
from loadtests.soak.ledger import (  # noqa: E402
    BASE,
    AdapterHistory,
    Markers,
    WriteLedger,
    check_answers,
    check_split,
    verify_state,
)

HERE = Path(__file__).resolve().parent
LOCUSTFILE = HERE / "locustfile.py"
ADMIN_KEY = "ss-soak-admin-" + "k9Xq2Lm7Vb4Tz8Wc"
USER_KEY = "ss-soak-user-" + "p3Rn6Hd1Jf5Gs0Ya"
CHURN_COLLECTION = "soak-churn"
TRAIN_ROWS = [
    {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
    for q, a in [
        ("What is the capital of France?", "Paris."),
        ("Hello world", "Hello!"),
        ("One base model?", "Many adapters."),
        ("0 1 2", "3 4 5"),
    ]
]


@dataclass
class Config:
    duration_s: int = 120
    users: int = 6
    base_model: str | None = None  # None: the bundled model (loadtests/_server.BENCH_BASE)
    tiny: bool = False  # a tiny random test model: quantization none, short context
    results: Path = HERE.parent / "results" / "soak"
    stable_adapters: int = 4  # registered once, never churned
    churn_adapters: int = 3  # registered, replaced, deleted, re-registered all run long
    variants: int = 6  # distinct weights (each with its own greedy marker)
    candidate_factor: int = 3  # random weight sets tried per one kept (see calibrate)
    max_tokens: int = 8
    max_num_seqs: int = 2  # users above it: the queue fills
    max_queue: int = 3  # and past it, 429
    max_loras: int = 2  # fewer resident than registered: eviction all the time
    max_cpu_loras: int = 3
    crash: bool = True
    train: bool = True
    adapter_scale: float | None = None  # random LoRA weights' scale; None: per base
    seed: int = 0
    sample_every_s: float = 5.0
    env: dict[str, str] = field(default_factory=dict)


# --- the server -------------------------------------------------------------------------------


class Server:
    """`python -m server.cli serve` in a session of its own (so a kill takes its training
    workers with it, as an OOM kill of the container would), on a fixed loopback port."""

    def __init__(self, cfg: Config, data_dir: Path, port: int, log: Path):
        self.cfg, self.data_dir, self.port, self.log = cfg, data_dir, port, log
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        from loadtests._server import BENCH_BASE

        base = cfg.base_model or BENCH_BASE
        self.env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "SWAPSERVE_BASE_MODEL": base,
            "SWAPSERVE_DATA_DIR": str(data_dir),
            "SWAPSERVE_MAX_NUM_SEQS": str(cfg.max_num_seqs),
            "SWAPSERVE_MAX_QUEUE": str(cfg.max_queue),
            "SWAPSERVE_MAX_LORAS": str(cfg.max_loras),
            "SWAPSERVE_MAX_CPU_LORAS": str(cfg.max_cpu_loras),
            "SWAPSERVE_API_KEYS": f"{ADMIN_KEY}:admin,{USER_KEY}:inference",
            "SWAPSERVE_SHUTDOWN_GRACE_S": "5",
            **(
                {
                    "SWAPSERVE_QUANTIZATION": "none",
                    "SWAPSERVE_DEVICE": "cpu",
                    "SWAPSERVE_MAX_MODEL_LEN": "512",
                    "SWAPSERVE_DEFAULT_MAX_TOKENS": "64",
                }
                if cfg.tiny
                else {}
            ),
            **cfg.env,
        }

    def start(self, timeout_s: float = 600) -> float:
        """Start and wait for /ready; the seconds it took."""
        t0 = time.monotonic()
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "server.cli", "serve", "--port", str(self.port)],
                env=self.env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            if time.monotonic() - t0 > timeout_s:
                self.kill()
                raise TimeoutError(f"server not ready in {timeout_s} s; see {self.log}")
            time.sleep(0.2)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc and self.proc.poll() is None else None

    def kill(self) -> None:
        """SIGKILL to the server's whole session: no clean-up of any kind."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            pass
        self.kill()  # and whatever it left in its session


def rss_bytes(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


# --- the run ------------------------------------------------------------------------------------


class Soak:
    def __init__(self, cfg: Config, workdir: Path):
        self.cfg = cfg
        self.work = workdir
        self.rng = random.Random(cfg.seed)
        cfg.results.mkdir(parents=True, exist_ok=True)
        self.server = Server(cfg, workdir / "data", free_port(), cfg.results / "server.log")
        self.admin = httpx.Client(
            base_url=self.server.url,
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            timeout=300,
        )
        self.user = httpx.Client(
            base_url=self.server.url, headers={"Authorization": f"Bearer {USER_KEY}"}, timeout=60
        )
        self.history = AdapterHistory()
        self.ledger = WriteLedger()
        self.expected: dict[str, dict[str, str]] = {}
        self.variant_paths: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, int]] | None = None
        self.markers: Markers | None = None
        self.split_arms: dict[str, str] = {}
        self.answers = cfg.results / "answers.jsonl"
        self.stable = [f"mark-{i}" for i in range(cfg.stable_adapters)]
        self.churned = [f"churn-{i}" for i in range(cfg.churn_adapters)]
        self.up = threading.Event()  # the server answers; churn waits on it
        self.stopping = threading.Event()
        self.in_flight = threading.Event()  # a churn write is on the wire
        self.churn_log: list[dict[str, Any]] = []
        self.samples: list[dict[str, Any]] = []
        self.events: dict[str, Any] = {"restarts": []}
        self._doc_ids = 0

    # -- set-up --

    def build_variant(self, seed: int) -> Path:
        """One random LoRA weight set, strong enough that its greedy answers part from the
        base's and the other sets' at the first tokens (see `calibrate`)."""
        if self._shapes is None:
            config = json.loads((self._base_path() / "config.json").read_text())
            self._shapes = linear_shapes_from_config(config.get("text_config", config))
        scale = self.cfg.adapter_scale or (0.3 if self.cfg.tiny else 0.06)
        return random_lora_adapter(
            self.work / "variants" / f"s{seed}", self._shapes, r=4, seed=seed, scale=scale,
            base_name=self._base_path().name,
        )  # fmt: skip

    def _base_path(self) -> Path:
        if self.cfg.tiny:
            return Path(self.server.env["SWAPSERVE_BASE_MODEL"])
        from trainer.base_model import resolve_base_model

        return Path(resolve_base_model(self.server.env["SWAPSERVE_BASE_MODEL"]))

    def _greedy(self, model: str, kind: str, prompt_i: int) -> str:
        path, _ = MARKED_KINDS[kind]
        body = marked_body(kind, model, prompt_i, self.cfg.max_tokens, False)
        for _ in range(600):  # the queue may be full under load: wait for a place
            r = self.admin.post(path, json=body)
            if r.status_code not in (429, 503):
                break
            time.sleep(0.5)
        if r.status_code != 200:
            raise RuntimeError(f"{kind} on {model}: HTTP {r.status_code}: {r.text[:300]}")
        return answer_text(kind, r.json())

    def _markers(self, model: str, *, rag: bool) -> dict[str, str]:
        out = {}
        for kind, (_, prompts) in MARKED_KINDS.items():
            if kind == "chat_rag" and not rag:
                continue
            for i in range(len(prompts)):
                out[f"{kind}/{i}"] = self._greedy(model, kind, i)
        return out

    def calibrate(self) -> None:
        """Each weight set's greedy answers, alone on the quiet server, right after
        registering it: the markers every later answer is checked against.

        The weight sets are chosen so that each one's signature is unmistakable: a
        candidate is kept only when, on every prompt, its answer's first token differs
        from the first token of the base's and of every set kept before it. Then an answer
        names its weights from its first tokens on, and a wrong-adapter verdict needs two
        tokens of another set's marker (ledger.MIN_EVIDENCE_TOKENS), which no single
        near-tie can write."""
        r = self.admin.post("/rag/collections", json={"name": RAG_COLLECTION})
        assert r.status_code in (201, 409), r.text
        r = self.admin.post(
            f"/rag/collections/{RAG_COLLECTION}/documents", json={"documents": RAG_DOCUMENTS}
        )
        r.raise_for_status()
        tokenize = base_tokenizer(self._base_path())
        self.expected[BASE] = self._markers(BASE, rag=True)
        firsts: dict[str, set[str]] = {}  # key -> first tokens taken

        def first_tokens(markers: dict[str, str]) -> dict[str, str]:
            return {k: (tokenize(t) or [""])[0] for k, t in markers.items()}

        for k, tok in first_tokens(self.expected[BASE]).items():
            firsts.setdefault(k, set()).add(tok)
        rejected: list[tuple[int, int, Path, dict[str, str]]] = []  # (clashes, seed, ...)
        seeds = range(100, 100 + self.cfg.candidate_factor * self.cfg.variants)
        tried = 0
        for seed in seeds:
            if len(self.variant_paths) == self.cfg.variants:
                break
            tried += 1
            path = self.build_variant(seed)
            name = f"calibrate-s{seed}"
            r = self.admin.post("/adapters", json={"name": name, "path": str(path)})
            r.raise_for_status()
            markers = self._markers(name, rag=False)
            self.admin.delete(f"/adapters/{name}").raise_for_status()
            ft = first_tokens(markers)
            clashes = sum(1 for k, tok in ft.items() if tok in firsts.get(k, set()))
            if clashes:
                rejected.append((clashes, seed, path, markers))
                continue
            self._keep_variant(path, markers, ft, firsts)
        # not enough clean candidates: the fewest clashes; the judge's per-prompt parting
        # point still keeps verdicts sound, with less evidence on the clashing prompts
        for clashes, seed, path, markers in sorted(rejected, key=lambda x: x[:2]):
            if len(self.variant_paths) == self.cfg.variants:
                break
            self._keep_variant(path, markers, first_tokens(markers), firsts)
            self.events.setdefault("first_token_clashes", []).append(
                {"seed": seed, "prompts": clashes}
            )
        self.events["candidates_tried"] = tried
        self.markers = Markers(self.expected, tokenize)
        # pairs of weight sets (base included) that no prompt separates could hide a
        # wrong answer: refuse to run
        names = sorted(self.expected)
        together = [
            (a, b)
            for i, a in enumerate(names)
            for b in names[i + 1 :]
            if all(
                self.expected[a][k] == self.expected[b].get(k, self.expected[a][k])
                for k in self.expected[a]
            )
        ]
        self.events["indistinguishable_variants"] = together
        if together:
            raise RuntimeError(
                f"markers cannot tell these weights apart: {together}; raise --adapter-scale"
            )

    def _keep_variant(
        self, path: Path, markers: dict[str, str], ft: dict[str, str], firsts: dict[str, set[str]]
    ) -> None:
        variant = f"v{len(self.variant_paths)}"
        self.variant_paths[variant] = path
        self.expected[variant] = markers
        for k, tok in ft.items():
            firsts.setdefault(k, set()).add(tok)

    def register_initial(self) -> None:
        for i, name in enumerate(self.stable + self.churned):
            variant = f"v{i % self.cfg.variants}"
            t = time.time()
            r = self.admin.post(
                "/adapters", json={"name": name, "path": str(self.variant_paths[variant])}
            )
            r.raise_for_status()
            self.history.acked(name, variant, t, time.time())
        r = self.admin.post("/rag/collections", json={"name": CHURN_COLLECTION})
        assert r.status_code in (201, 409), r.text
        # the A/B split runs inside the churn: two arms on churned names (replaced and
        # deleted under it), one on the base
        r = self.admin.post("/ab/splits", json={"name": SPLIT, "arms": [
            {"name": f"arm-{m}", "model": m} for m in [*self.churned[:2], BASE]]})  # fmt: skip
        assert r.status_code == 201, r.text
        self.split_arms = {a["name"]: a["model"] for a in r.json()["arms"]}

    # -- churn --

    def _write(self, method: str, path: str, **kw: Any) -> tuple[int, float, float, Any]:
        """One churn write; status 0 when the server never answered (it died under it)."""
        self.up.wait()
        sent = time.time()
        self.in_flight.set()
        error = None
        try:
            r = self.admin.request(method, path, **kw)
            status, body = r.status_code, r
            if status >= 500:
                error = r.text[:300]
        except httpx.HTTPError as exc:
            status, body, error = 0, exc, repr(exc)[:300]
        finally:
            self.in_flight.clear()
        acked = time.time()
        self.churn_log.append(
            {"t0": sent, "t1": acked, "op": f"{method} {path}", "status": status,
             "during_restart": not self.up.is_set(), "error": error}
        )  # fmt: skip
        return status, sent, acked, body

    def _adapter_op(self) -> None:
        name = self.rng.choice(self.churned)
        variant = self.rng.choice(sorted(self.variant_paths))
        path = str(self.variant_paths[variant])
        alias = self.rng.random() < 0.5  # vLLM's routes half the time
        op = self.rng.choice(["register", "replace", "delete"])
        if op == "register":
            status, sent, acked, _ = self._write(
                "POST", "/adapters", json={"name": name, "path": path}
            )
            result: str | None = variant
            good = status == 201
        elif op == "replace":
            if alias:
                req = {"lora_name": name, "lora_path": path, "load_inplace": True}
                status, sent, acked, _ = self._write("POST", "/v1/load_lora_adapter", json=req)
            else:
                req = {"name": name, "path": path, "replace": True}
                status, sent, acked, _ = self._write("POST", "/adapters", json=req)
            result, good = variant, status in (200, 201)
        else:
            if alias:
                req = {"lora_name": name}
                status, sent, acked, _ = self._write("POST", "/v1/unload_lora_adapter", json=req)
            else:
                status, sent, acked, _ = self._write("DELETE", f"/adapters/{name}")
            result, good = None, status == 200
        if good:
            self.history.acked(name, result, sent, acked)
        elif status == 0:
            self.history.unknown(name, result, sent)
        # a 4xx (409: exists, 404: already gone) changes nothing

    def _doc_op(self) -> None:
        present = self.ledger.present_docs()
        if present and self.rng.random() < 0.4:
            doc = self.rng.choice(present)
            status, *_ = self._write(
                "DELETE", f"/rag/collections/{CHURN_COLLECTION}/documents/{doc}"
            )
            new = "absent" if status == 200 else "unknown" if status == 0 else None
        else:
            self._doc_ids += 1
            doc = f"d{self._doc_ids}"
            text = f"soak note {doc}: " + " ".join(self.rng.sample(WORDS, 8))
            status, *_ = self._write(
                "POST",
                f"/rag/collections/{CHURN_COLLECTION}/documents",
                json={"documents": [{"id": doc, "text": text}]},
            )
            new = "present" if status == 200 else "unknown" if status == 0 else None
        if new:
            with self.ledger.lock:
                self.ledger.docs[doc] = new

    def _train_op(self) -> None:
        config = {"r": 4, "max_steps": 2, "batch_size": 2, "max_length": 64,
                  "eval_fraction": 0.0}  # fmt: skip
        name = f"trained-{len(self.ledger.jobs)}"
        status, _, _, r = self._write(
            "POST", "/train/sft", json={"name": name, "data": TRAIN_ROWS, "config": config}
        )
        if status == 202:
            with self.ledger.lock:
                self.ledger.jobs.add(r.json()["id"])
        self.events.setdefault("train_submits", []).append(status)

    def _forbidden_op(self) -> None:
        """The inference-scoped key tries admin calls: each must be a 403."""
        self.up.wait()
        calls = [
            ("POST", "/adapters", {"json": {"name": "x", "path": "/tmp"}}),
            ("DELETE", f"/adapters/{self.stable[0]}", {}),
            ("POST", "/v1/load_lora_adapter", {"json": {"lora_name": "x", "lora_path": "/tmp"}}),
            ("GET", "/metrics", {}),
            ("POST", f"/rag/collections/{CHURN_COLLECTION}/documents",
             {"json": {"documents": [{"text": "x"}]}}),
            ("POST", "/train/sft", {"json": {"name": "x", "data": TRAIN_ROWS}}),
        ]  # fmt: skip
        method, path, kw = self.rng.choice(calls)
        try:
            status = self.user.request(method, path, **kw).status_code
        except httpx.HTTPError:
            status = 0
        self.events.setdefault("forbidden", []).append(
            {"t": time.time(), "op": f"{method} {path}", "status": status}
        )

    def churn(self) -> None:
        ops = [(self._adapter_op, 5), (self._doc_op, 3), (self._forbidden_op, 1)]
        if self.cfg.train:
            self._train_op()
        while not self.stopping.is_set():
            op = self.rng.choices([o for o, _ in ops], [w for _, w in ops])[0]
            try:
                op()
            except Exception as exc:  # the churn must go on; the report shows what broke
                self.events.setdefault("churn_errors", []).append(repr(exc)[:300])
            self.stopping.wait(self.rng.uniform(0.05, 0.5))

    # -- sampling --

    def sample(self) -> None:
        while not self.stopping.is_set():
            row: dict[str, Any] = {"t": time.time(), "pid": self.server.pid}
            row["rss"] = rss_bytes(row["pid"])
            if self.up.is_set():
                try:
                    text = self.admin.get("/metrics", timeout=10).text
                    row.update(parse_metrics(text))
                except httpx.HTTPError:
                    pass
            self.samples.append(row)
            self.stopping.wait(self.cfg.sample_every_s)

    # -- the crash --

    def crash_and_restart(self, at_s: float, t_start: float) -> None:
        if self.stopping.wait(max(0.0, t_start + at_s - time.time())):
            return
        # kill while a write is on the wire (up to 20 s to catch one)
        self.in_flight.wait(20)
        self.up.clear()
        t_kill = time.time()
        self.server.kill()
        time.sleep(self.rng.uniform(0.0, 1.0))
        ready_s = self.server.start()
        t_ready = time.time()
        found = self.verify("after the restart")
        self.events["restarts"].append(
            {"killed": t_kill, "ready": t_ready, "ready_s": ready_s, "lost": found["lost"],
             "staging_left": found["staging_left"], "quarantined": found["quarantined"]}
        )  # fmt: skip
        self.up.set()

    # -- checks --

    def server_adapters(self) -> dict[str, str]:
        by_path = {str(p): v for v, p in self.variant_paths.items()}
        listed = self.admin.get("/adapters").json()["data"]
        return {a["name"]: by_path.get(a["source"], f"other:{a['source']}") for a in listed}

    def verify(self, when: str, *, final: bool = False) -> dict[str, Any]:
        """Acknowledged writes against what the server holds; settles unknown outcomes."""
        # the clients' records first, the server's state after: every answer a client got
        # before this read was logged by the server before it was sent
        records = read_records(self.answers)
        adapters = self.server_adapters()
        docs = {
            d["id"]
            for d in self.admin.get(
                f"/rag/collections/{CHURN_COLLECTION}/documents", params={"limit": 1000}
            ).json()["data"]
        }
        jobs = {j["id"]: j for j in self.admin.get("/train/jobs").json()["data"]}
        split = self.admin.get(f"/ab/splits/{SPLIT}").json()
        lost = verify_state(
            adapters=adapters,
            history=self.history,
            names=self.stable + self.churned,
            docs_on_server=docs,
            ledger=self.ledger,
            jobs_on_server=set(jobs),
        )
        split_lost, split_extra, split_figures = check_split(
            records, split, model=f"ab:{SPLIT}", final=final
        )
        lost += split_lost
        # every registered adapter is whole: it answers with its own weights' marker (or
        # drifts from it, never towards another's: see Markers.judge)
        now = time.time()
        assert self.markers is not None
        for name in self.stable + self.churned:
            variant = adapters.get(name)
            if variant is None:
                continue
            got = self._greedy(name, "chat", 0)
            j = self.markers.judge(got, "chat/0", {variant})
            if j.verdict == "wrong":
                lost.append(f"adapter {name}: answers {got!r}: {j.reason}")
            elif j.verdict == "ambiguous":
                self.events.setdefault("ambiguous_at_verify", []).append(
                    {"adapter": name, "variant": variant, "text": got, "reason": j.reason}
                )
        # settle what the kill left unknown
        for name in self.churned:
            self.history.settle(name, adapters.get(name), now)
        with self.ledger.lock:
            for doc, state in list(self.ledger.docs.items()):
                if state == "unknown":
                    self.ledger.docs[doc] = "present" if doc in docs else "absent"
        data = Path(self.server.env["SWAPSERVE_DATA_DIR"])
        staging = data / "adapters" / ".staging"
        quarantine = data / "adapters" / "quarantine"
        found = {
            "when": when,
            "lost": lost,
            "staging_left": sorted(p.name for p in staging.iterdir()) if staging.exists() else [],
            "quarantined": sorted(p.name for p in quarantine.iterdir())
            if quarantine.exists()
            else [],
            "jobs": {j: jobs[j]["state"] for j in jobs},
            "split": {**split_figures, "extra": split_extra},
        }
        self.events.setdefault("verifications", []).append(found)
        return found

    # -- everything --

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        answers = self.answers
        answers.unlink(missing_ok=True)
        first_ready_s = self.server.start()
        self.events["first_ready_s"] = first_ready_s
        print(f"server {self.server.url} ready in {first_ready_s:.1f} s; calibrating", flush=True)
        try:
            self.calibrate()
            self.register_initial()
            self.up.set()
            env = {
                **os.environ,
                "PYTHONPATH": str(ROOT),
                "SOAK_MODELS": ",".join([BASE, *self.stable, *self.churned]),
                "SOAK_MAX_TOKENS": str(cfg.max_tokens),
                "SOAK_API_KEY": USER_KEY,
                "SOAK_ANSWERS": str(answers),
            }
            t_start = time.time()
            self.events["t_start"] = t_start
            threads = [
                threading.Thread(target=self.churn, name="churn", daemon=True),
                threading.Thread(target=self.sample, name="sample", daemon=True),
            ]
            if cfg.crash:
                at = self.rng.uniform(0.35, 0.6) * cfg.duration_s
                threads.append(
                    threading.Thread(
                        target=self.crash_and_restart, args=(at, t_start), name="crash", daemon=True
                    )
                )
            for t in threads:
                t.start()
            print(f"locust: {cfg.users} users for {cfg.duration_s} s", flush=True)
            run_locust(self.server.url, cfg, env)
            self.events["t_end"] = time.time()
            self.stopping.set()
            self.up.set()  # release anything waiting, then let the threads finish
            for t in threads:
                t.join(600 if t.name == "crash" else 60)
            final = self.verify("at the end", final=True)
            records = read_records(answers)
            assert self.markers is not None
            check = check_answers(records, self.history, self.markers, self.split_arms)
            self.samples.append(
                {"t": time.time(), "pid": self.server.pid, "rss": rss_bytes(self.server.pid),
                 **parse_metrics(self.admin.get("/metrics").text)}
            )  # fmt: skip
        finally:
            self.stopping.set()
            self.up.set()
            self.server.stop()
        from loadtests.soak.report import build_report

        return build_report(
            cfg=cfg,
            records=records,
            check=check,
            churn=self.churn_log,
            samples=self.samples,
            events=self.events,
            final=final,
            expected=self.expected,
            markers=self.markers,
        )


WORDS = ("apple orchard river stone lantern harbour violin meadow copper signal "
         "falcon garden winter ember canyon").split()  # fmt: skip


def read_records(path: Path) -> list[dict[str, Any]]:
    """The clients' answer records so far (a line being written is left for later)."""
    out: list[dict[str, Any]] = []
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def base_tokenizer(base_path: Path) -> Callable[[str], list[str]]:
    """The base's tokenizer, as a text -> token strings function: the judge compares
    answers with markers token by token, the unit greedy decoding chooses in."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_path))
    return lambda text: list(tok.tokenize(text)) if text else []


def parse_metrics(text: str) -> dict[str, float]:
    """The few Prometheus numbers the report uses."""
    out: dict[str, float] = {"loaded_total": 0.0, "evicted_total": 0.0}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"([a-z_]+)(\{[^}]*\})? ([0-9.eE+-]+)$", line.strip())
        if not m:
            continue
        name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        if name == "swapserve_adapter_events_total":
            if 'event="loaded"' in labels:
                out["loaded_total"] += value
            elif 'event="evicted"' in labels:
                out["evicted_total"] += value
        elif name in (
            "swapserve_engine_queue_depth",
            "swapserve_engine_running",
            "swapserve_engine_process_rss_bytes",
        ):
            out[name.removeprefix("swapserve_engine_")] = value
    return out


def run_locust(url: str, cfg: Config, env: dict[str, str]) -> None:
    prefix = cfg.results / "locust"
    cmd = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
        "-u", str(cfg.users), "-r", str(max(1, cfg.users / 5)), "-t", f"{cfg.duration_s}s",
        "--host", url, "--csv", str(prefix), "--html", str(cfg.results / "locust.html"),
        "--exit-code-on-error", "0", "--stop-timeout", "120", "--only-summary",
        "--loglevel", "WARNING",
    ]  # fmt: skip
    with (cfg.results / "locust.log").open("w") as out:
        # a hard bound above locust's own: the run ends by itself even if locust hangs
        subprocess.run(
            cmd,
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=cfg.duration_s + 300,
            check=True,
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=int, default=600, help="seconds of load")
    ap.add_argument("--users", type=int, default=8, help="locust users (above max_num_seqs)")
    ap.add_argument("--base-model", default=None, help="default: the bundled model")
    ap.add_argument("--tiny", action="store_true", help="--base-model is a tiny test model")
    ap.add_argument("--results", type=Path, default=Config.results)
    ap.add_argument("--no-crash", action="store_true", help="no SIGKILL mid-run")
    ap.add_argument("--no-train", action="store_true", help="no training job")
    ap.add_argument("--max-num-seqs", type=int, default=Config.max_num_seqs)
    ap.add_argument("--max-queue", type=int, default=Config.max_queue)
    ap.add_argument("--adapter-scale", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    cfg = Config(
        duration_s=args.duration,
        users=args.users,
        base_model=args.base_model,
        tiny=args.tiny,
        results=args.results,
        crash=not args.no_crash,
        train=not args.no_train,
        max_num_seqs=args.max_num_seqs,
        max_queue=args.max_queue,
        adapter_scale=args.adapter_scale,
        seed=args.seed,
        sample_every_s=5.0 if args.duration >= 300 else 2.0,
    )
    with tempfile.TemporaryDirectory(prefix="swapserve-soak-") as tmp:
        summary = Soak(cfg, Path(tmp)).run()
    print(summary["text"])
    return 0 if summary["all_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
