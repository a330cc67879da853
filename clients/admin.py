"""The first client's interface, kept for code written against it: adapter calls that
return plain dicts. New code: `clients.Swapserve`, which covers every admin route and
returns the server's own models.

    from clients.admin import SwapserveAdmin
    admin = SwapserveAdmin("http://127.0.0.1:8000")
    admin.register_adapter("support-v2", "/path/to/peft-folder")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clients.errors import SwapserveError
from clients.swapserve import Swapserve

__all__ = ["SwapserveAdmin", "SwapserveError"]


class SwapserveAdmin:
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 600.0):
        self.client = Swapserve(base_url, api_key, timeout=timeout)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> SwapserveAdmin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _dict(model: Any) -> dict:
        return model.model_dump(mode="json", by_alias=True)

    def register_adapter(self, name: str, path: str | Path, *, replace: bool = False) -> dict:
        return self._dict(self.client.adapters.register(name, path, replace=replace))

    def upload_adapter(self, name: str, archive: str | Path, *, replace: bool = False) -> dict:
        return self._dict(self.client.adapters.upload(name, archive, replace=replace))

    def list_adapters(self) -> list[dict]:
        return [self._dict(a) for a in self.client.adapters.list()]

    def get_adapter(self, name: str) -> dict:
        return self._dict(self.client.adapters.get(name))

    def delete_adapter(self, name: str) -> dict:
        return self._dict(self.client.adapters.delete(name))

    def ready(self) -> dict:
        return self.client.ready()
