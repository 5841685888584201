"""Circuit breakers, one per deployment (named by its backend).

    closed ── `failures` in a row, or an error rate over the window ──► open
      ▲                                                                 │ cooldown
      └──────── the probe succeeds ◄── half-open: one probe request ◄───┘
                (it fails: open again)

Each replica counts the outcomes it sees; a circuit it opens is opened for every replica
through the `CircuitStore` (Redis), which `sync` reads every `SYNC_SECONDS`, and only one
replica probes a deployment whose cooldown is over.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import structlog

from gateway.config import CircuitConfig
from gateway.errors import ServiceUnavailable
from gateway.routing.traffic import Traffic
from gateway.stores.circuits import CircuitStore

log = structlog.get_logger("gateway.routing.circuits")

CLOSED, HALF_OPEN, OPEN = 0, 1, 2  # also the values of the `gateway_circuit_state` gauge
STATE_NAMES = {CLOSED: "closed", HALF_OPEN: "half_open", OPEN: "open"}
SYNC_SECONDS = 1.0


@dataclass(slots=True)
class _Circuit:
    state: int = CLOSED
    open_until: float = 0.0
    failures_in_row: int = 0
    probing: bool = False
    # the clock when the state last changed: the error rate counts only what came after
    counted_from: float = float("-inf")


class Circuits:
    def __init__(self, config: CircuitConfig, store: CircuitStore, names: Iterable[str],
                 traffic: Traffic, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.store = store
        self.traffic = traffic  # attempts and failures per deployment, recorded by the router
        self.clock = clock
        self._circuits = {name: _Circuit() for name in names}
        self._syncing: asyncio.Task[None] | None = None

    # -- the request path --------------------------------------------------------------------

    async def allow(self, name: str) -> bool:
        """Whether a request may go to `name` now: closed, or this one is its probe."""
        circuit = self._circuits[name]
        if circuit.state == CLOSED:
            return True
        now = self.clock()
        if circuit.probing or (circuit.state == OPEN and now < circuit.open_until):
            return False
        try:
            won = await self.store.claim_probe(name, self.config.cooldown)
        except ServiceUnavailable:
            won = True  # no shared store to ask: this replica probes for itself
        if not won:  # another replica probes: look again in a moment
            circuit.open_until = now + SYNC_SECONDS
            return False
        circuit.state, circuit.probing = HALF_OPEN, True
        return True

    def record(self, name: str, ok: bool) -> None:
        """The outcome of one attempt on `name` (a failure is the deployment's: a 5xx, a 429,
        a timeout, a refused connection), which `traffic` already counted as begun."""
        circuit = self._circuits[name]
        if not ok:
            self.traffic.failed(name)
        if circuit.probing:
            circuit.probing = False
            self.store.probe_done(name)
            if ok:
                self._close(name, circuit)
            else:
                self._open(name, circuit, "probe_failed")
            return
        if circuit.state != CLOSED:
            return  # an attempt begun before the circuit opened
        if ok:
            circuit.failures_in_row = 0
            return
        circuit.failures_in_row += 1
        if self._tripped(name, circuit):
            self._open(name, circuit, "failing")

    def _tripped(self, name: str, circuit: _Circuit) -> bool:
        config = self.config
        if circuit.failures_in_row >= config.failures:
            return True
        # attempts still in flight count as not failed: the rate errs on the side of traffic
        counts = self.traffic.counts(name, config.window, circuit.counted_from)
        return (counts.attempts >= config.min_requests
                and counts.failures / counts.attempts >= config.error_rate)

    def _open(self, name: str, circuit: _Circuit, why: str) -> None:
        now = self.clock()
        circuit.state, circuit.open_until = OPEN, now + self.config.cooldown
        circuit.failures_in_row, circuit.counted_from = 0, now
        self.store.trip(name, self.config.cooldown)
        log.warning("circuit_opened", deployment=name, why=why, cooldown=self.config.cooldown)

    def _close(self, name: str, circuit: _Circuit) -> None:
        circuit.state, circuit.failures_in_row = CLOSED, 0
        circuit.counted_from = self.clock()
        log.info("circuit_closed", deployment=name)

    # -- shared state ------------------------------------------------------------------------

    async def sync(self) -> None:
        """Open here what another replica opened."""
        now = self.clock()
        for name, left in (await self.store.opened()).items():
            circuit = self._circuits.get(name)
            if circuit is not None and circuit.state == CLOSED:
                circuit.state, circuit.open_until = OPEN, now + left
                circuit.counted_from = now
                log.warning("circuit_opened", deployment=name, why="another_replica")

    async def start(self) -> None:
        self._syncing = asyncio.create_task(self._sync_loop(), name="circuits-sync")

    async def aclose(self) -> None:
        if self._syncing is not None:
            self._syncing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._syncing

    async def _sync_loop(self) -> None:
        while True:
            await asyncio.sleep(SYNC_SECONDS)
            with contextlib.suppress(ServiceUnavailable):  # the store is away: keep our view
                await self.sync()

    # -- what operators see --------------------------------------------------------------------

    def state(self, name: str) -> int:
        return self._circuits[name].state

    def health(self) -> list[dict[str, object]]:
        """Each deployment's circuit: state, failures in a row, recent outcomes."""
        now = self.clock()
        rows: list[dict[str, object]] = []
        for name, circuit in sorted(self._circuits.items()):
            counts = self.traffic.counts(name, self.config.window, circuit.counted_from)
            rows.append({
                "deployment": name, "state": STATE_NAMES[circuit.state],
                "failures_in_row": circuit.failures_in_row,
                "recent_requests": counts.attempts,
                "recent_errors": counts.failures,
                "reopens_in": max(0.0, round(circuit.open_until - now, 3))
                if circuit.state == OPEN else None,
            })
        return rows
