"""The handlers' resources, opened once at start-up and closed after the last job.

A factory registered with `@daemon.resource(Kind)` is called with the Settings; whatever its
async context manager yields is the daemon's one Kind, handed to handlers as
`ctx.resource(Kind)`. Nothing module-global: a handler never runs without its resources."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AsyncExitStack
from typing import Any

from daemon.config import Settings
from daemon.engine.registry import ResourceFactory
from daemon.errors import ConfigError


class Resources(Mapping[type[Any], object]):
    def __init__(self) -> None:
        self._items: dict[type[Any], object] = {}
        self._stack = AsyncExitStack()

    async def open(
        self, factories: Mapping[type[Any], ResourceFactory], settings: Settings
    ) -> None:
        for kind, factory in factories.items():
            value = await self._stack.enter_async_context(factory(settings))
            if not isinstance(value, kind):
                raise ConfigError(
                    f"resource factory {factory.__module__}.{factory.__qualname__} yielded a "
                    f"{type(value).__name__}, not the {kind.__name__} it was registered for"
                )
            self._items[kind] = value

    async def close(self) -> None:
        self._items.clear()
        await self._stack.aclose()

    def __getitem__(self, kind: type[Any]) -> object:
        return self._items[kind]

    def __iter__(self) -> Iterator[type[Any]]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)
