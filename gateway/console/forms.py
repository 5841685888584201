"""From a submitted form to a validated body: blank fields mean "not set", lists are typed
comma-separated, and the admin API's own pydantic models check the values, so the console
accepts exactly what ``/admin`` accepts and names the field it refuses."""

from __future__ import annotations

import re
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from gateway.config import format_validation_error
from gateway.console.guard import Form

Body = TypeVar("Body", bound=BaseModel)


def items(text: str) -> list[str]:
    """``"qa, rag"`` -> ``["qa", "rag"]``."""
    return [part for part in re.split(r"[\s,]+", text) if part]


def parse(form: Form, model: type[Body], *, lists: tuple[str, ...] = ()) -> Body | str:
    """The form's non-blank fields among `model`'s, validated; else the message to show."""
    data: dict[str, Any] = {}
    for name in model.model_fields:
        value = form.get(name, "").strip()
        if value:
            data[name] = items(value) if name in lists else value
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        return format_validation_error(exc)
