"""The client's I/O as values, so that each call of the API is written once for both clients.

A *program* is a generator that yields the operations below and is sent back what each one
gave (or has its exception thrown in); it returns the call's result. `Client` performs the
operations with blocking httpx/websockets calls and `AsyncClient` awaits them: the two
differ in how they do I/O and in nothing else (the "sans-I/O" pattern, with generators).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import Any, Generic, TypeAlias, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Call:
    """One HTTP request, sent as is: it gives the httpx.Response or raises TransportError."""

    method: str
    path: str
    json: Any = None
    headers: dict[str, str] | None = None


@dataclass(frozen=True)
class Sleep:
    """Wait `seconds`. A `backoff` wait goes through the client's `sleep` (tests replace it)."""

    seconds: float
    backoff: bool = False


@dataclass(frozen=True)
class Connect:
    """Open a WebSocket to `url`; it gives the connection."""

    url: str


@dataclass(frozen=True)
class Send:
    """Send `text` as one message on `ws`."""

    ws: Any
    text: str


@dataclass(frozen=True)
class Recv:
    """The next message of `ws` (str or bytes); TimeoutError after `timeout` seconds."""

    ws: Any
    timeout: float


@dataclass(frozen=True)
class Close:
    """Close `ws` (a connection that has already dropped too)."""

    ws: Any


Operation: TypeAlias = Call | Sleep | Connect | Send | Recv | Close
Program: TypeAlias = Generator[Operation, Any, T]


@dataclass(frozen=True)
class Outcome:
    """What performing an operation gave: a value, or the exception it raised."""

    value: Any = None
    error: BaseException | None = None


def outcome(perform: Callable[[Operation], Any], op: Operation) -> Outcome:
    try:
        return Outcome(perform(op))
    except BaseException as e:  # KeyboardInterrupt too: the program may close what it opened
        return Outcome(error=e)


async def async_outcome(perform: Awaitable[Any]) -> Outcome:
    try:
        return Outcome(await perform)
    except BaseException as e:  # CancelledError too, as above
        return Outcome(error=e)


class Stepper(Generic[T]):
    """Runs a program one operation at a time: `operation` is the one to perform next (None
    once the program has returned `result`); an exception the program raises goes out of
    `resume` to the caller, as it would from a plain function."""

    def __init__(self, program: Program[T]) -> None:
        self.program = program
        self.operation: Operation | None = None
        self.result: T  # set when the program returns
        self.resume(Outcome())

    def resume(self, outcome: Outcome) -> None:
        """Hand the program what its operation gave; it runs on to its next operation."""
        try:
            if outcome.error is not None:
                self.operation = self.program.throw(outcome.error)
            else:
                self.operation = self.program.send(outcome.value)
        except StopIteration as stop:
            self.operation, self.result = None, stop.value
