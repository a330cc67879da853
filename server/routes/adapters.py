"""Adapter admin routes, and vLLM's load/unload routes as aliases with vLLM's shapes."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, Field

from server.adapter_validation import AdapterError
from server.adapters import AdapterRegistry
from server.errors import APIError
from server.protocol import ErrorResponse

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


class RegisterAdapter(BaseModel):
    name: str = Field(description="The `model` id clients will use for this adapter.")
    path: str = Field(
        description="A PEFT adapter folder on the server's file system (LoRA, IA3, prompt "
        "tuning, P-tuning, prefix tuning, LN tuning or trainable tokens)."
    )
    replace: bool = Field(False, description="Replace an adapter of the same name.")


class AdapterInfo(BaseModel):
    model_config = {"extra": "allow"}
    id: str
    object: str = "adapter"
    name: str
    parent: str
    path: str
    kind: str = Field(
        "lora",
        description="the adapter's method: lora, ia3, prompt_tuning, p_tuning, prefix_tuning, "
        "ln_tuning or trainable_tokens (PEFT's peft_type, lower-cased)",
    )
    peft_type: str = "LORA"
    parameters: int = Field(0, description="trained numbers the adapter applies")
    rank: int | None = Field(None, description="LoRA's largest rank; null for other kinds")
    virtual_tokens: int = Field(
        0,
        description="context positions every request gives up to the adapter's virtual "
        "tokens or KV prefix (prompt tuning, P-tuning, prefix tuning)",
    )
    target_modules: list[str]
    trained_tokens: list[int] = Field(
        default_factory=list, description="token ids whose embedding rows the adapter trained"
    )
    base_check: dict[str, str | None] = Field(
        default_factory=dict,
        description="what its base_model_name_or_path says: status matches, "
        "same_architecture, unverified (a name this server cannot judge) or none",
    )
    size_bytes: int
    location: str
    load_count: int
    requests: int


class AdapterList(BaseModel):
    object: str = "list"
    data: list[AdapterInfo]


class Deleted(BaseModel):
    id: str
    object: str = "adapter"
    deleted: bool = True


class LoadLoRA(BaseModel):
    """vLLM's request body for POST /v1/load_lora_adapter."""

    lora_name: str
    lora_path: str
    load_inplace: bool = False


class UnloadLoRA(BaseModel):
    lora_name: str
    lora_int_id: int | None = None


def _form_bool(value: Any) -> bool:
    return str(value).lower() in ("1", "true", "yes", "on")


@router.post(
    "/adapters",
    status_code=201,
    response_model=AdapterInfo,
    responses=ERRORS,
    openapi_extra={
        "requestBody": {
            "content": {
                "application/json": {"schema": RegisterAdapter.model_json_schema()},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["name", "file"],
                        "properties": {
                            "name": {"type": "string"},
                            "replace": {"type": "boolean"},
                            "file": {"type": "string", "format": "binary"},
                        },
                    }
                },
            },
            "required": True,
        }
    },
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
        with tempfile.NamedTemporaryFile(dir=registry.staging, delete=False) as tmp:
            shutil.copyfileobj(upload.file, tmp)
        try:
            return await registry.register_archive(
                name, Path(tmp.name), upload.filename or "", replace=_form_bool(form.get("replace"))
            )
        finally:
            Path(tmp.name).unlink(missing_ok=True)
    try:
        body = RegisterAdapter.model_validate_json(await request.body())
    except ValueError as exc:
        raise APIError(400, f"invalid request body: {exc}".splitlines()[0], param="body") from exc
    return await registry.register_path(body.name, Path(body.path), replace=body.replace)


@router.get("/adapters", response_model=AdapterList)
async def list_adapters(registry: RegistryDep) -> dict[str, Any]:
    return {"object": "list", "data": registry.list()}


@router.get("/adapters/{name}", response_model=AdapterInfo, responses=ERRORS)
async def get_adapter(name: str, registry: RegistryDep) -> dict[str, Any]:
    return registry.describe(name)


@router.delete("/adapters/{name}", response_model=Deleted, responses=ERRORS)
async def delete_adapter(name: str, registry: RegistryDep) -> Deleted:
    await registry.unregister(name)
    return Deleted(id=name)


@router.post("/v1/load_lora_adapter", response_class=PlainTextResponse, responses=ERRORS)
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


@router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse, responses=ERRORS)
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
