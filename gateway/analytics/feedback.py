"""End-user feedback (thumbs up/down) forwarded to the Inkeep Analytics ``/feedback`` endpoint.

The message ids a client refers to are the deterministic ones the Inkeep sink gives each
exchange (`gateway.analytics.sinks.message_ids`), returned on the chat response in
``x-gateway-message-id``. Reasons are accepted as strings or ``{"label", "details"}``
objects and forwarded as objects.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.analytics.sinks import InkeepAnalyticsSink, message_ids
from gateway.errors import InvalidRequest

__all__ = ["FeedbackRequest", "forward_feedback", "message_ids", "validate_feedback"]


class Reason(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label: str = Field(min_length=1, max_length=200)
    details: str | None = Field(default=None, max_length=4000)


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    type: Literal["positive", "negative"]
    message_id: str = Field(alias="messageId", min_length=1, max_length=200)
    reasons: list[Reason | str] | None = Field(default=None, max_length=20)
    details: str | None = Field(default=None, max_length=4000)
    user_properties: dict[str, Any] | None = Field(default=None, alias="userProperties")

    def payload(self) -> dict[str, Any]:
        body: dict[str, Any] = {"type": self.type, "messageId": self.message_id}
        if self.reasons:
            body["reasons"] = [
                {"label": r} if isinstance(r, str) else r.model_dump(exclude_none=True)
                for r in self.reasons
            ]
        if self.details is not None:
            body["details"] = self.details
        if self.user_properties is not None:
            body["userProperties"] = self.user_properties
        return body


def validate_feedback(body: Any) -> FeedbackRequest:
    """Parse a client's feedback body; `InvalidRequest` names the offending field."""
    if not isinstance(body, dict):
        raise InvalidRequest("The feedback body must be a JSON object.")
    try:
        return FeedbackRequest.model_validate(body)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        message = err["msg"] if param is None else f"{param}: {err['msg']}"
        raise InvalidRequest(f"Invalid feedback: {message}", param=param) from None


async def forward_feedback(sink: InkeepAnalyticsSink, body: dict[str, Any]) -> dict[str, Any]:
    """Validate and POST to ``{url}/feedback``; returns the Analytics API's reply.

    Raises `InvalidRequest` (400) for a bad body, `UpstreamError` subclasses when the
    Analytics API fails or refuses (rendered 502/504/429 by the HTTP layer)."""
    request = validate_feedback(body)
    return await sink.feedback(request.payload())
