"""The circuit breakers' error rate and the retry budget, on the traffic the router records,
with a clock the test moves (the end-to-end behaviour is in test_routing.py)."""

from __future__ import annotations

from gateway.config import CircuitConfig, RetryBudgetConfig
from gateway.routing.budget import RetryBudget
from gateway.routing.circuits import CLOSED, OPEN, Circuits
from gateway.routing.traffic import Traffic
from gateway.stores.circuits import MemoryCircuitStore


class Clock:
    """Monotonic seconds that only move when a test moves them."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def breakers(clock: Clock, **config: float) -> tuple[Circuits, Traffic]:
    circuit = CircuitConfig(**{"failures": 100, "min_requests": 10, "error_rate": 0.5,
                               "window": 30, "cooldown": 20, **config})
    traffic = Traffic(["a"], circuit.window, clock)  # as long as the circuits read
    return Circuits(circuit, MemoryCircuitStore(clock), ["a"], traffic, clock=clock), traffic


def attempt(circuits: Circuits, traffic: Traffic, ok: bool) -> None:
    traffic.attempt("a", retry=False)
    circuits.record("a", ok=ok)


def test_an_error_rate_over_the_window_opens_the_circuit() -> None:
    clock = Clock()
    circuits, traffic = breakers(clock)
    for n in range(9):  # every other attempt fails: never many in a row, yet half of them
        attempt(circuits, traffic, ok=n % 2 == 0)
        clock.now += 1
    assert circuits.state("a") == CLOSED  # fewer than min_requests so far
    attempt(circuits, traffic, ok=False)
    assert circuits.state("a") == OPEN
    [row] = circuits.health()
    assert row["reopens_in"] == 20


def test_failures_older_than_the_window_are_forgotten() -> None:
    clock = Clock()
    circuits, traffic = breakers(clock)
    for _ in range(9):
        attempt(circuits, traffic, ok=False)
    clock.now += 31
    for _ in range(9):
        attempt(circuits, traffic, ok=True)
    attempt(circuits, traffic, ok=False)  # 1 of 10 in the window
    assert circuits.state("a") == CLOSED
    [row] = circuits.health()
    assert (row["recent_requests"], row["recent_errors"]) == (10, 1)


async def test_a_closed_circuit_does_not_count_what_opened_it() -> None:
    clock = Clock()
    circuits, traffic = breakers(clock, failures=3, min_requests=4, window=120)
    for _ in range(3):
        attempt(circuits, traffic, ok=False)
    assert circuits.state("a") == OPEN
    clock.now += 20  # the cooldown is over: one probe, which succeeds
    assert await circuits.allow("a")
    assert not await circuits.allow("a")  # only one probe at a time
    clock.now += 1
    attempt(circuits, traffic, ok=True)
    assert circuits.state("a") == CLOSED
    clock.now += 1
    for _ in range(3):  # 5 of 9 failed within the window, but 3 of those before the close
        attempt(circuits, traffic, ok=True)
    for _ in range(2):
        attempt(circuits, traffic, ok=False)
    assert circuits.state("a") == CLOSED
    [row] = circuits.health()
    assert (row["recent_requests"], row["recent_errors"]) == (5, 2)


def test_retries_are_a_share_of_the_requests_in_the_window() -> None:
    clock = Clock()
    traffic = Traffic(["a", "b"], 10, clock)
    budget = RetryBudget(RetryBudgetConfig(ratio=0.2, window=10, min_retries=1), traffic)
    for _ in range(10):
        traffic.attempt("a", retry=False)
    allowed = 0
    while budget.allows_retry("a"):
        traffic.attempt("a", retry=True)
        allowed += 1
    assert allowed == 3  # 20% of 10, plus one
    assert budget.allows_retry("b")  # each backend has its own
    clock.now += 10  # those requests and retries have left the window
    assert budget.allows_retry("a")
    assert traffic.counts("a", 10).attempts == 0
