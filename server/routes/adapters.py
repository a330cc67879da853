"""Adapter admin routes, and vLLM's load/unload routes as aliases with vLLM's shapes."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse
from pydantic import ValidationError

from server.adapter_validation import AdapterError, check_name
from server.adapters import AdapterRegistry
from server.errors import APIError
from server.openapi import error_responses, request_body
from server.schemas import (
    AdapterDeleted,
    AdapterInfo,
    AdapterList,
    ErrorResponse,
    LoadLoRA,
    RegisterAdapter,
    RegisterAdapterUpload,
    UnloadLoRA,
)

router = APIRouter(tags=["adapters"])

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 404, 409, 413, 503)
}


def get_registry(request: Request) -> AdapterRegistry:
    registry = getattr(request.app.state, "adapters", None)
    if registry is None:
        raise APIError(503, "the base model is still loading", code="model_loading")
    return registry


RegistryDep = Annotated[AdapterRegistry, Depends(get_registry)]


def _form_bool(value: Any) -> bool:
    return str(value).lower() in ("1", "true", "yes", "on")


@router.post(
    "/adapters",
    status_code=201,
    response_model=AdapterInfo,
    responses=ERRORS,
    openapi_extra=request_body(
        json=RegisterAdapter, multipart=RegisterAdapterUpload, description="a folder or an archive"
    ),
)
async def register_adapter(request: Request, registry: RegistryDep) -> dict[str, Any]:
    """Register from a local folder (JSON) or an uploaded .tar.gz/.zip (multipart)."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await request.form()
        name = form.get("name")
        upload = form.get("file")
        if not isinstance(name, str) or not name:
            raise APIError(400, "form field 'name' is required", param="name")
        if upload is None or isinstance(upload, str):
            raise APIError(400, "form field 'file' (the archive) is required", param="file")
        archive: Path | None = None
        try:  # the archive goes whatever happens, a full disk mid-copy included
            with tempfile.NamedTemporaryFile(dir=registry.staging, delete=False) as tmp:
                archive = Path(tmp.name)
                shutil.copyfileobj(upload.file, tmp)
            return await registry.register_archive(
                name, archive, upload.filename or "", replace=_form_bool(form.get("replace"))
            )
        finally:
            if archive is not None:
                archive.unlink(missing_ok=True)
    try:
        body = RegisterAdapter.model_validate_json(await request.body())
    except ValidationError as exc:
        if any(
            e["loc"] == ("name",) and e["type"] == "string_pattern_mismatch" for e in exc.errors()
        ):
            raw = json.loads(await request.body())
            check_name(str(raw.get("name")), set())  # its 400 says what a name may hold
        # the app's handler turns it into the 400 naming the field, as for every body
        raise RequestValidationError(exc.errors()) from exc
    return await registry.register_path(body.name, Path(body.path), replace=body.replace)


@router.get("/adapters", response_model=AdapterList)
async def list_adapters(registry: RegistryDep) -> dict[str, Any]:
    return {"object": "list", "data": registry.list()}


@router.get("/adapters/{name}", response_model=AdapterInfo, responses=ERRORS)
async def get_adapter(name: str, registry: RegistryDep) -> dict[str, Any]:
    return registry.describe(name)


@router.delete("/adapters/{name}", response_model=AdapterDeleted, responses=ERRORS)
async def delete_adapter(name: str, registry: RegistryDep) -> AdapterDeleted:
    await registry.unregister(name)
    return AdapterDeleted(id=name)


@router.post(
    "/v1/load_lora_adapter",
    response_class=PlainTextResponse,
    responses=error_responses(400, 404, 409, 413, 503),
)
async def vllm_load(body: LoadLoRA, registry: RegistryDep) -> str:
    if not Path(body.lora_path).expanduser().exists():
        # vLLM answers a path that does not exist with 404 (its tooling reads it so)
        raise AdapterError(
            404,
            f"Loading lora {body.lora_name} failed: No adapter found for {body.lora_path}",
            "adapter_not_found",
            "lora_path",
        )
    await registry.register_path(body.lora_name, Path(body.lora_path), replace=body.load_inplace)
    return f"Success: LoRA adapter '{body.lora_name}' added successfully."


@router.post(
    "/v1/unload_lora_adapter",
    response_class=PlainTextResponse,
    responses=error_responses(400, 404, 409, 413, 503),
)
async def vllm_unload(body: UnloadLoRA, registry: RegistryDep) -> str:
    try:
        await registry.unregister(body.lora_name)
    except AdapterError as exc:
        if exc.status == 404:  # vLLM's wording for an unknown adapter
            raise AdapterError(
                404,
                f"The lora adapter '{body.lora_name}' cannot be found.",
                "adapter_not_found",
                "lora_name",
            ) from exc
        raise
    return f"Success: LoRA adapter '{body.lora_name}' removed successfully."
