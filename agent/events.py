"""The event bus: consumers (processes, cgroups) and resources (CPU packages, RAPL domains) that start
and end while the agent runs.

Publishers are `agent exec`/`agent watch` (the command's processes), the `cgroups` source (cgroups as
they appear and vanish) and sources that discover hardware (RAPL domains). Subscribers are plugins that
measure per consumer, such as `procfs`, which starts following a process when told.

A plugin subscribes in `start` through `StartContext.subscribe`. Listeners are plain functions called
synchronously, in subscription order, in the publisher's task: they must only record what they are
told (a set to update, a flag to set) and leave the measuring to their source's next poll. A listener
that raises is logged and the others still run.

Unlike Alumet's bus, the bus remembers what is active: a listener that subscribes after a consumer was
announced (or with `replay=True`, the default) is told about it first, so the order in which plugins
start does not decide what they see.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

import msgspec

from agent.errors import describe_exception
from agent.model import AttributeValue, Consumer, Resource

log = logging.getLogger(__name__)

EventKind = Literal["consumer_started", "consumer_ended", "resource_started", "resource_ended"]


class Event(msgspec.Struct, frozen=True, kw_only=True):
    """One event. `consumer` is set for consumer events, `resource` for resource events; `attributes`
    describe it (a process's start time, a cgroup's systemd unit, a RAPL domain's name)."""

    kind: EventKind
    consumer: Consumer | None = None
    resource: Resource | None = None
    attributes: dict[str, AttributeValue] = msgspec.field(default_factory=dict)

    @property
    def subject(self) -> Consumer | Resource:
        subject = self.consumer if self.consumer is not None else self.resource
        assert subject is not None, "an event names a consumer or a resource"
        return subject


Listener = Callable[[Event], None]


class EventBus:
    """Delivers events to listeners and keeps the set of consumers and resources currently started."""

    def __init__(self) -> None:
        self._listeners: list[tuple[Listener, frozenset[EventKind] | None]] = []
        self._active: dict[Consumer | Resource, Event] = {}

    def subscribe(
        self, listener: Listener, kinds: set[EventKind] | None = None, *, replay: bool = True
    ) -> Callable[[], None]:
        """Calls `listener` for every event of `kinds` (all kinds if None). With `replay`, it is first
        told about each consumer and resource already started. Returns a function that unsubscribes."""
        entry = (listener, frozenset(kinds) if kinds is not None else None)
        self._listeners.append(entry)
        if replay:
            for event in list(self._active.values()):
                self._deliver(entry, event)

        def unsubscribe() -> None:
            if entry in self._listeners:
                self._listeners.remove(entry)

        return unsubscribe

    def publish(self, event: Event) -> None:
        """Records and delivers `event`. Announcing a started consumer twice, or ending one that was
        never started, is delivered anyway: listeners keep their own sets and can ignore repeats."""
        if event.kind.endswith("_started"):
            self._active[event.subject] = event
        else:
            self._active.pop(event.subject, None)
        for entry in list(self._listeners):
            self._deliver(entry, event)

    def consumer_started(self, consumer: Consumer, **attributes: AttributeValue) -> None:
        self.publish(Event(kind="consumer_started", consumer=consumer, attributes=attributes))

    def consumer_ended(self, consumer: Consumer, **attributes: AttributeValue) -> None:
        self.publish(Event(kind="consumer_ended", consumer=consumer, attributes=attributes))

    def resource_started(self, resource: Resource, **attributes: AttributeValue) -> None:
        self.publish(Event(kind="resource_started", resource=resource, attributes=attributes))

    def resource_ended(self, resource: Resource, **attributes: AttributeValue) -> None:
        self.publish(Event(kind="resource_ended", resource=resource, attributes=attributes))

    def active(self) -> list[Event]:
        """The start events of the consumers and resources that have not ended, oldest first."""
        return list(self._active.values())

    @staticmethod
    def _deliver(entry: tuple[Listener, frozenset[EventKind] | None], event: Event) -> None:
        listener, kinds = entry
        if kinds is not None and event.kind not in kinds:
            return
        try:
            listener(event)
        except Exception as exc:
            log.error(
                "event listener %s failed on %s %s: %s",
                getattr(listener, "__qualname__", repr(listener)),
                event.kind,
                event.subject,
                describe_exception(exc),
            )


__all__ = ["Event", "EventBus", "EventKind", "Listener"]
