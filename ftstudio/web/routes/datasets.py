"""Datasets and models: an upload parsed as it streams, straight to disk and bounded all the way,
and the datasets and models the studio knows."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, Request
from fastapi.concurrency import run_in_threadpool

from ftstudio.errors import ValidationError
from ftstudio.studio.incoming import too_large
from ftstudio.studio.service import Service
from ftstudio.web.context import ServiceDep
from ftstudio.web.uploads import MULTIPART_OVERHEAD, MultipartFile

router = APIRouter(prefix="/api")

UPLOAD_WRITE_BYTES = 1 << 20
# The upload route parses its body itself (to bound it as it streams), so FastAPI cannot infer
# its schema; this keeps /openapi.json describing it as a form with one file field.
UPLOAD_SCHEMA: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "The dataset: .jsonl, .json, .csv, .parquet, or .txt (raw text)",
                        }
                    },
                }
            }
        },
    },
    "responses": {
        "413": {"description": "Larger than the studio's upload limit (`studio start --max-upload-mb`)"},
        "422": {"description": "Not a dataset file, or a row that cannot be trained on (named by line)"},
        "507": {"description": "The data home is full or read-only"},
    },
}


@router.post("/datasets", status_code=201, openapi_extra=UPLOAD_SCHEMA)
async def upload_dataset(request: Request, service: ServiceDep) -> dict[str, Any]:
    """Upload a dataset file (.jsonl, .json, .csv, .parquet, or .txt for continued pre-training) as the multipart
    field `file`."""
    return await _receive_upload(service, request)


@router.get("/datasets")
def list_datasets(service: ServiceDep) -> dict[str, Any]:
    return {"datasets": service.datasets()}


@router.get("/datasets/{name}")
def show_dataset(name: str, service: ServiceDep) -> dict[str, Any]:
    return service.dataset(name)


@router.get("/datasets/{name}/inspect")
def inspect_dataset(
    name: str,
    service: ServiceDep,
    model: Annotated[str, Query(max_length=500)] = "builtin:tiny",
    max_length: Annotated[int | None, Query(ge=1, le=1 << 20)] = None,
    method: Annotated[str, Query(max_length=20)] = "sft",
    data_format: Annotated[str, Query(alias="format", max_length=20)] = "auto",
    eval_prompts: Annotated[str, Query(max_length=500)] = "",
    validation: Annotated[str, Query(max_length=500)] = "",
    rows: Annotated[int, Query(ge=0, le=200)] = 20,
) -> dict[str, Any]:
    """What the model will learn from a bundled or uploaded dataset: its shape, the rows as the trainer sees them
    (which tokens carry the loss), lengths and truncation at max_length, duplicates, held-out prompts and validation
    rows found among the training rows, and tokens per epoch. Kept per file content and settings."""
    service.dataset_name(name)
    data: dict[str, Any] = {"path": name, "format": data_format, "validation": validation or "0"}
    if max_length is not None:
        data["max_length"] = max_length
    config: dict[str, Any] = {"model": {"name": model}, "data": data, "method": method}
    if eval_prompts:
        config["evaluation"] = {"prompts": eval_prompts}
    return service.inspect_data(config, view_rows=rows)


DERIVE_EXAMPLE = {"drop": "duplicates", "eval_prompts": "", "validation": ""}


@router.post("/datasets/{name}/derive", status_code=201)
def derive_dataset(
    name: str, service: ServiceDep, body: Annotated[dict[str, Any], Body(examples=[DERIVE_EXAMPLE])]
) -> dict[str, Any]:
    """A new dataset from a bundled or uploaded one, without its exact duplicates (`drop: duplicates`) or without the
    rows whose prompt is a held-out prompt or validation row (`drop: leaked`, with `eval_prompts` or `validation`).
    The original is never changed."""
    unknown = sorted(set(body) - set(DERIVE_EXAMPLE))
    if unknown:
        raise ValidationError(f"unknown field {unknown[0][:40]!r}; a derive takes drop, eval_prompts and validation")
    values = {k: body.get(k, "") for k in DERIVE_EXAMPLE}
    if not all(isinstance(v, str) and len(v) <= 500 for v in values.values()):
        raise ValidationError("drop, eval_prompts and validation are strings of at most 500 characters")
    return service.derive_dataset(
        name, values["drop"], eval_prompts=values["eval_prompts"], validation=values["validation"]
    )


@router.get("/models")
def list_models(service: ServiceDep) -> dict[str, Any]:
    return {"models": service.models()}


async def _receive_upload(service: Service, request: Request) -> dict[str, Any]:
    """Parse the multipart body as it arrives, the file part going straight to disk, bounded all the way."""
    limit = service.upload_limit()
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + MULTIPART_OVERHEAD:
        raise too_large(limit)  # before a byte of the body is read
    incoming = await run_in_threadpool(service.receive_dataset)
    try:
        form = MultipartFile(request.headers.get("content-type", ""), incoming)
        received, pending = 0, bytearray()
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit + MULTIPART_OVERHEAD:
                raise too_large(limit)
            pending += chunk
            if len(pending) >= UPLOAD_WRITE_BYTES:  # one trip to a worker thread per MB, not per packet
                await run_in_threadpool(form.feed, bytes(pending))
                pending.clear()
        await run_in_threadpool(form.feed, bytes(pending))
        form.finish()
        return await run_in_threadpool(service.add_dataset, incoming)
    finally:
        await run_in_threadpool(incoming.discard)
