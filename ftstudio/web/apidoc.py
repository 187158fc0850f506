"""The OpenAPI document as the studio really answers: one error shape everywhere, and the
gate's refusals (401/403/413/415) on every operation. Clients and the fuzz suite read it,
so it must not promise FastAPI's default error body, which the studio never sends."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

ERROR_REF = {"$ref": "#/components/schemas/Error"}
ERROR_SCHEMA: dict[str, Any] = {
    "title": "Error",
    "type": "object",
    "required": ["detail"],
    "properties": {
        "detail": {"type": "string", "description": "One line naming the problem and the fix"},
        "problems": {
            "type": "array",
            "description": "Each field that is wrong, with what to do about it",
            "items": {
                "type": "object",
                "required": ["field", "message"],
                "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
            },
        },
    },
}
GATE_ANSWERS = {
    "401": "No token, a wrong one, or a page's signature that does not hold (see `ftstudio studio url`)",
    "403": "A foreign Host or Origin",
}
CHANGE_ANSWERS = {
    "413": "The request body is too large",
    "415": "The body is not JSON (uploads: not multipart/form-data)",
    "507": "The data home is full or read-only",
}


def install(app: FastAPI) -> None:
    """Replace `app.openapi` with one that describes errors as they are sent."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        schemas["Error"] = ERROR_SCHEMA
        schemas.pop("HTTPValidationError", None)
        schemas.pop("ValidationError", None)
        for path, item in doc.get("paths", {}).items():
            for method, op in item.items():
                answers = op.setdefault("responses", {})
                extra = dict(GATE_ANSWERS) if path != "/api/health" else {}
                if method.upper() in ("POST", "PUT", "PATCH", "DELETE"):
                    extra.update(CHANGE_ANSWERS)
                for code, text in extra.items():
                    answers.setdefault(code, {"description": text})
                for code, answer in answers.items():
                    if code[0] in "45":
                        answer["content"] = {"application/json": {"schema": ERROR_REF}}
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
