"""Handler registry: kind -> (callable, payload model, per-handler options)."""

from __future__ import annotations

import importlib
import json
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel

from daemon.errors import ConfigError

if TYPE_CHECKING:
    from daemon.context import JobContext

HandlerFunc = Callable[["JobContext", Any], Awaitable[Any]]
F = TypeVar("F", bound=HandlerFunc)


@dataclass(frozen=True)
class Handler:
    kind: str
    func: HandlerFunc
    payload: type[BaseModel] | None = None
    timeout: float | None = None
    max_attempts: int | None = None
    max_result_bytes: int | None = None  # None: the queue's
    # Seconds the handler needs after its task is cancelled (shutdown) to stop cleanly, e.g.
    # to stop a child process; the shutdown waits that long for it (at least 5 s).
    stop_grace: float | None = None

    def parse_json(self, text: str) -> Any:
        """The handler's argument from the payload's JSON text: a validated model (in one
        pass), or the decoded JSON when no model is set."""
        if self.payload is None:
            return {} if text == "{}" else json.loads(text)
        return self.payload.model_validate_json(text)


LifecycleHook = Callable[[Any], Awaitable[None]]
# Called with the daemon's Settings; what its context yields is the resource, for every job.
ResourceFactory = Callable[[Any], AbstractAsyncContextManager[Any]]
R = TypeVar("R", bound=ResourceFactory)


class Registry:
    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}
        self.startup_hooks: list[LifecycleHook] = []
        self.shutdown_hooks: list[LifecycleHook] = []
        self.resources: dict[type[Any], ResourceFactory] = {}

    def resource(self, kind: type[Any]) -> Callable[[R], R]:
        """Register `factory(settings)`, an async context manager yielding the daemon's one
        `kind` (an SMTP pool, an HTTP session, a client): opened at start-up, before any job,
        closed after the last one; handlers read it as `ctx.resource(kind)`."""

        def register(factory: R) -> R:
            existing = self.resources.get(kind)
            if existing is not None and existing is not factory:
                raise ConfigError(
                    f"two resources registered for {kind.__name__}: "
                    f"{_where(existing)} and {_where(factory)}"
                )
            self.resources[kind] = factory
            return factory

        return register

    def on_startup(self, func: LifecycleHook) -> LifecycleHook:
        """Run `await func(settings)` once the daemon has its configuration, before any job:
        open long-lived resources (an SMTP connection pool, an HTTP session) here."""
        self.startup_hooks.append(func)
        return func

    def on_shutdown(self, func: LifecycleHook) -> LifecycleHook:
        """Run `await func(settings)` after the last job has finished: close resources here."""
        self.shutdown_hooks.append(func)
        return func

    def handler(
        self,
        kind: str,
        *,
        payload: type[BaseModel] | None = None,
        timeout: float | None = None,
        max_attempts: int | None = None,
        max_result_bytes: int | None = None,
        stop_grace: float | None = None,
    ) -> Callable[[F], F]:
        """Register `async def f(ctx, payload)` to run jobs of `kind`. `stop_grace`: seconds
        the handler needs, once cancelled at the shutdown deadline, to stop cleanly (the
        shutdown waits for it that long at most, and at least 5 s)."""
        if not kind or len(kind) > 200:
            raise ValueError("handler kind must be 1-200 characters")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"handler {kind!r}: timeout must be > 0 seconds")
        if max_attempts is not None and max_attempts < 1:
            raise ValueError(f"handler {kind!r}: max_attempts must be >= 1")
        if max_result_bytes is not None and max_result_bytes < 64:
            raise ValueError(f"handler {kind!r}: max_result_bytes must be >= 64")
        if stop_grace is not None and not 0 <= stop_grace <= 86_400:
            raise ValueError(f"handler {kind!r}: stop_grace must be 0..86400 seconds")

        def register(func: F) -> F:
            existing = self._handlers.get(kind)
            if existing is not None and existing.func is not func:
                raise ConfigError(
                    f"two handlers registered for kind {kind!r}: "
                    f"{_where(existing.func)} and {_where(func)}"
                )
            self._handlers[kind] = Handler(
                kind, func, payload, timeout, max_attempts, max_result_bytes, stop_grace
            )
            return func

        return register

    def get(self, kind: str) -> Handler | None:
        return self._handlers.get(kind)

    def kinds(self) -> list[str]:
        return sorted(self._handlers)


def _where(func: Callable[..., Any]) -> str:
    return f"{func.__module__}.{func.__qualname__}"


# The process-wide registry that `@daemon.handler` fills.
REGISTRY = Registry()
handler = REGISTRY.handler
on_startup = REGISTRY.on_startup
on_shutdown = REGISTRY.on_shutdown
resource = REGISTRY.resource


def import_handler_modules(modules: list[str]) -> None:
    """Import the built-in handlers and every module listed in `handler_modules`."""
    for name in ["handlers", *modules]:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(
                f"handler_modules: cannot import {name!r}: {exc} "
                "(is it installed in this virtualenv, or on PYTHONPATH?)"
            ) from exc
