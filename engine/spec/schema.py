"""The JSON Schema of a spec document, generated from the pydantic models (committed under ``schemas/``)."""

from __future__ import annotations

from typing import Any

from engine.spec.models import KernelSpec


def json_schema() -> dict[str, Any]:
    schema = KernelSpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "engine kernel spec"
    return schema
