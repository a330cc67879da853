"""The locust scenario's task mix, checked without running any load.

Importing locust monkey-patches the process with gevent (sockets, threads, ssl), which
would leak into every later test of the session; so the locustfile is imported in a child
interpreter and only its task table comes back.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

if importlib.util.find_spec("locust") is None:  # the `loadtest` extra is optional
    pytest.skip("locust is not installed (pip install .[loadtest])", allow_module_level=True)

PROBE = """
import collections, json
from loadtests import locustfile
weights = collections.Counter(t.__name__ for t in locustfile.SwapserveUser.tasks)
print(json.dumps(dict(weights)))
"""

BASE_TASKS = {"chat_stream": 4, "chat": 3, "completion_stream": 2, "completion": 2}


def task_weights(**env: str) -> dict[str, int]:
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("SWAPSERVE_LT_")}
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT,
        env={**child_env, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_default_mix_leaves_out_what_needs_setup() -> None:
    # no collection, no spare adapter: no RAG tasks, no register/unregister
    assert task_weights() == {**BASE_TASKS, "list_adapters": 1}


def test_rag_and_admin_tasks_join_when_configured() -> None:
    weights = task_weights(SWAPSERVE_LT_RAG_COLLECTION="docs", SWAPSERVE_LT_SPARE_PATH="/tmp/spare")
    assert weights == {
        **BASE_TASKS,
        "list_adapters": 1,
        "chat_stream_rag": 2,
        "chat_rag": 1,
        "swap_spare_adapter": 1,
    }
    # inference dominates; admin calls stay a small share of the mix
    admin = weights["list_adapters"] + weights["swap_spare_adapter"]
    assert admin / sum(weights.values()) < 0.2
