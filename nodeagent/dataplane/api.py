"""The contract between the agent core and its dataplane step.

The agent core (socket server, reconcile) calls a ``Dataplane`` between "request accepted" and "ack".
Calls are blocking and come from worker threads: implementations must be thread-safe and idempotent
per pod (a second ``add`` of the same pod leaves one copy of everything).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from cni_plugin import errors
from nodeagent.dataplane.rules import RedirectMode, Variant


@dataclass(frozen=True)
class PodControls:
    """A pod's own redirection controls (its annotations), decided by the agent and carried in ``PodWork``.

    ``dns_capture`` None: the agent's default. ``problem``: why the annotations cannot be honoured (the
    enrollment is then refused with that message)."""

    dns_capture: bool | None = None
    bypass_inbound: bool = False
    reroute_interfaces: tuple[str, ...] = ()
    problem: str = ""

    def variant(self, mode: RedirectMode, dns_default: bool) -> Variant:
        """The rule set for this pod under the agent's mode and DNS default (ValueError on a bad interface)."""
        return Variant(
            mode=mode,
            dns_capture=dns_default if self.dns_capture is None else self.dns_capture,
            inbound_capture=not self.bypass_inbound,
            reroute_interfaces=self.reroute_interfaces,
        )


DEFAULT_CONTROLS = PodControls()


@dataclass(frozen=True)
class PodWork:
    """Everything the dataplane needs to enroll or remove one pod."""

    uid: str
    name: str
    namespace: str
    netns_path: str  # as the runtime gave it (CNI_NETNS) or as found by the agent (/proc/<pid>/ns/net)
    container_id: str = ""
    ifname: str = "eth0"
    ips: tuple[str, ...] = ()  # CIDR strings, v4 and v6
    service_account: str = ""
    netns_inode: int = 0  # the netns identity the caller expects at netns_path (inode, device); 0 when unknown
    netns_dev: int = 0
    controls: PodControls = DEFAULT_CONTROLS  # the pod's annotations, from the agent's cluster view
    # The variant decided by the caller (the one recorded, for a pod absent from the view); None: from ``controls``
    variant: Variant | None = None
    # The netns holds this pod's rules, kept by a CNI DEL: a failed add must leave them (fail closed)
    rules_kept: bool = False


class DataplaneError(Exception):
    """Enrollment could not be put in place. ``retryable`` maps to CNI code 11, otherwise ``code``."""

    def __init__(self, msg: str, *, retryable: bool = False, code: int = errors.REDIRECTION_FAILED) -> None:
        super().__init__(msg)
        self.msg = msg
        self.retryable = retryable
        self.code = errors.TRY_AGAIN_LATER if retryable else code


class NetnsGone(DataplaneError):
    """The netns at the pod's path is not the one enrolled (replaced or gone): nothing was done inside it."""


class Dataplane(Protocol):
    # Whether a CNI DEL may keep the pod's in-pod rules (``release``) until a re-ADD or ``discard_kept``
    keeps_rules: bool

    def add(self, pod: PodWork, deadline: float) -> int:
        """Install redirection for ``pod`` and hand its netns to ztunnel; return only after the ack.

        ``deadline`` is a ``time.monotonic()`` instant. Returns the netns inode that was enrolled.
        Raises DataplaneError; on failure nothing of this call stays behind.
        """
        ...

    def remove(self, pod: PodWork) -> None:
        """Best effort: ZDS del, rules removed if the netns still exists. Never raises for a missing netns."""
        ...

    def release(self, pod: PodWork) -> None:
        """CNI DEL of a pod whose netns lives on: its probe-set entries go first, then ztunnel drops it (ZDS Del:
        its listeners close, so redirected traffic is refused), and the dataplane forgets it; the in-pod rules
        and routes stay. Best effort, never raises for a missing netns."""
        ...

    def discard_kept(self, pod: PodWork) -> None:
        """Remove the rules a ``release`` kept in ``pod``'s netns, after checking that the path still names that
        netns (inode and device): NetnsGone otherwise, and nothing is done inside whatever is there. Raises
        DataplaneError when the netns is enrolled again or the removal failed."""
        ...

    def variant_for(self, pod: PodWork) -> Variant | None:
        """The variant ``pod`` gets now (``pod.variant``, else its controls under the agent's defaults); None when
        this dataplane installs no rules. Raises DataplaneError when the pod's controls cannot be honoured."""
        ...

    def change_variant(self, pod: PodWork) -> tuple[Variant, Variant] | None:
        """Bring a held pod's rules to ``variant_for(pod)`` under guardrails when its installed variant differs.
        Returns (installed before, installed now), equal when nothing changed; None when the dataplane does not
        hold the pod in that netns. Raises DataplaneError (the guardrails then stay: fail closed)."""
        ...

    def restore(self, pod: PodWork, deadline: float) -> list[str]:
        """Take over a pod enrolled by an earlier run: verify that its netns is the recorded one (NetnsGone
        otherwise), repair drift under guardrails, hand it to ztunnel. Returns the drift found and repaired.
        Never removes redirection on failure."""
        ...

    def verify(self, pods: list[PodWork]) -> list[list[str] | None]:
        """Drift per pod, in order: [] as expected, a list of differences, or None when not checked now."""
        ...

    def repair(self, pod: PodWork) -> list[str]:
        """Rewrite a drifted pod's redirection under guardrails; returns the drift found. Raises DataplaneError
        (traffic then stays stopped by the guardrails)."""
        ...

    def ready(self) -> tuple[bool, str]:
        """Whether ADDs can be served now (e.g. a ztunnel is connected), with a reason when not."""
        ...

    def sync_host(self, known: list[PodWork], prune: bool) -> dict[str, int]:
        """After a reconcile pass: node-side state (probe rules and sets) made to match the enrolled pods
        (``known``: recorded pods the dataplane may not hold yet). Returns counts of what was repaired."""
        ...

    def uninstall(self) -> list[str]:
        """Remove the node-side state (a real uninstall, not a restart). Returns what was removed."""
        ...

    def debug_info(self) -> dict[str, Any]:
        """What ``doctor`` needs to know about the dataplane (mode, DNS default, node netns, pod variants)."""
        ...

    def close(self) -> None: ...


class NoopDataplane:
    """The dataplane that does nothing (``--dataplane noop``): every pod is accepted and nothing is installed, no
    ztunnel is told. For agent tests and benchmarks of the wire protocol, the records, the views and restarts,
    where no network namespace may change."""

    keeps_rules = False  # it installs none

    def add(self, pod: PodWork, deadline: float) -> int:
        return pod.netns_inode

    def remove(self, pod: PodWork) -> None:
        return None

    def release(self, pod: PodWork) -> None:
        return None

    def discard_kept(self, pod: PodWork) -> None:
        return None

    def variant_for(self, pod: PodWork) -> Variant | None:
        return None

    def change_variant(self, pod: PodWork) -> tuple[Variant, Variant] | None:
        return None

    def restore(self, pod: PodWork, deadline: float) -> list[str]:
        return []

    def verify(self, pods: list[PodWork]) -> list[list[str] | None]:
        return [[] for _ in pods]  # nothing is installed, so nothing can drift

    def repair(self, pod: PodWork) -> list[str]:
        return []

    def ready(self) -> tuple[bool, str]:
        return True, ""

    def sync_host(self, known: list[PodWork], prune: bool) -> dict[str, int]:
        return {}

    def uninstall(self) -> list[str]:
        return []

    def debug_info(self) -> dict[str, Any]:
        return {"dataplane": "noop"}

    def close(self) -> None:
        return None
