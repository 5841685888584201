"""The seam through which routing reports the health of its deployments (circuit breakers)
to the console: an optional `HealthSource` on the gateway's state; without one, the console
says that no circuit breaking is configured."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class DeploymentHealth:
    deployment: str  # the deployment's name (a model may have several)
    backend: str
    state: str  # the circuit's state: "closed", "open", "half-open"
    recent_errors: int  # failures the breaker counts now
    detail: str | None = None  # e.g. "opened 12 s ago, next try in 18 s"


class HealthSource(Protocol):
    async def deployments(self) -> list[DeploymentHealth]:
        """Every deployment's circuit, now."""
        ...
