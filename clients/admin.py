"""A small Python client for swapserve's admin API (what the `openai` SDK does not cover).

    from clients.admin import SwapserveAdmin
    admin = SwapserveAdmin("http://127.0.0.1:8000")
    admin.register_adapter("support-v2", "/path/to/peft-folder")
    admin.list_adapters()

Errors come back as `SwapserveError` with the server's status, code, param and message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx


class SwapserveError(Exception):
    def __init__(self, status: int, body: dict[str, Any]):
        error = body.get("error", {}) if isinstance(body, dict) else {}
        self.status = status
        self.code = error.get("code")
        self.param = error.get("param")
        self.message = error.get("message", str(body))
        super().__init__(f"{status} {self.code}: {self.message}")


class SwapserveAdmin:
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 600.0):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SwapserveAdmin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        r = self._http.request(method, path, **kwargs)
        if r.status_code >= 400:
            try:
                body = r.json()
            except ValueError:
                body = {"error": {"message": r.text}}
            raise SwapserveError(r.status_code, body)
        return r.json()

    # --- adapters ---------------------------------------------------------------------------

    def register_adapter(self, name: str, path: str | Path, *, replace: bool = False) -> dict:
        """Register a PEFT LoRA folder that the server can read."""
        return self._call(
            "POST", "/adapters", json={"name": name, "path": str(path), "replace": replace}
        )

    def upload_adapter(self, name: str, archive: str | Path, *, replace: bool = False) -> dict:
        """Upload a .tar.gz/.zip of a PEFT LoRA folder (for a server on another machine)."""
        archive = Path(archive)
        with archive.open("rb") as f:
            return self._call(
                "POST",
                "/adapters",
                data={"name": name, "replace": str(replace).lower()},
                files={"file": (archive.name, f)},
            )

    def list_adapters(self) -> list[dict]:
        return self._call("GET", "/adapters")["data"]

    def get_adapter(self, name: str) -> dict:
        return self._call("GET", f"/adapters/{name}")

    def delete_adapter(self, name: str) -> dict:
        return self._call("DELETE", f"/adapters/{name}")

    # --- server -----------------------------------------------------------------------------

    def ready(self) -> dict:
        return self._call("GET", "/ready")
