"""Cluster-view data (immutable) and the holder both sources publish through."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

TERMINAL_PHASES = ("Succeeded", "Failed")


@dataclass(frozen=True)
class Namespace:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    uid: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    host_network: bool = False
    node_name: str = ""
    phase: str = ""
    service_account: str = ""
    ips: tuple[str, ...] = ()  # status.podIPs: lets the agent check a netns it found without a CNI event

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL_PHASES


@dataclass(frozen=True)
class ClusterState:
    """One consistent picture; replaced as a whole on every change (readers never lock)."""

    namespaces: Mapping[str, Namespace] = field(default_factory=dict)
    pods: Mapping[tuple[str, str], Pod] = field(default_factory=dict)
    generation: int = 0

    def namespace_labels(self, namespace: str) -> Mapping[str, str] | None:
        ns = self.namespaces.get(namespace)
        return None if ns is None else ns.labels

    def pod(self, namespace: str, name: str) -> Pod | None:
        return self.pods.get((namespace, name))


class ClusterView(Protocol):
    """What the agent needs from a cluster-view source."""

    kind: str

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def synced(self) -> tuple[bool, str]:
        """Whether a complete view is held, with the reason when not."""
        ...

    def state(self) -> ClusterState: ...

    def wait_for_change(self, generation: int, timeout: float) -> ClusterState:
        """Block until the view's generation differs from ``generation`` or ``timeout`` passes."""
        ...

    def subscribe(self, callback: Callable[[ClusterState], None]) -> None: ...


class ViewHolder:
    """Shared state machinery of the sources: copy-on-write state, sync flag, change notification."""

    kind = "base"

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._state = ClusterState()
        self._synced = False
        self._reason = "cluster view not loaded yet"
        self._callbacks: list[Callable[[ClusterState], None]] = []

    def subscribe(self, callback: Callable[[ClusterState], None]) -> None:
        self._callbacks.append(callback)

    def synced(self) -> tuple[bool, str]:
        with self._cond:
            return self._synced, "" if self._synced else self._reason

    def state(self) -> ClusterState:
        return self._state

    def _publish(
        self, namespaces: Mapping[str, Namespace], pods: Mapping[tuple[str, str], Pod], synced: bool = True
    ) -> None:
        with self._cond:
            self._state = ClusterState(
                namespaces=MappingProxyType(dict(namespaces)),
                pods=MappingProxyType(dict(pods)),
                generation=self._state.generation + 1,
            )
            if synced:
                self._synced = True
            state = self._state
            self._cond.notify_all()
        for callback in self._callbacks:
            callback(state)

    def _set_reason(self, reason: str) -> None:
        with self._cond:
            self._reason = reason

    def wait_for_change(self, generation: int, timeout: float) -> ClusterState:
        end = time.monotonic() + timeout
        with self._cond:
            while self._state.generation == generation:
                remaining = end - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            return self._state
