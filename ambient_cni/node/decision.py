"""Restart or uninstall? The pure decision taken on SIGTERM (``--uninstall-on-stop``).

Keeping everything is the safe default: the chain, the binary, the host rules and sets and the snapshot stay,
so new enrolled pods wait (fail closed) until the next agent is up. Uninstalling is right only when the API
says this node's DaemonSet is really gone for this node. Decision table (auto):

| what the API says                                         | decision  |
|-----------------------------------------------------------|-----------|
| DaemonSet found, no deletionTimestamp, targets the node   | keep      |
| DaemonSet found with a deletionTimestamp                  | uninstall |
| DaemonSet found, no longer targets the node               | uninstall |
| DaemonSet not found (404)                                 | uninstall |
| 401 Unauthorized (our service account is gone)            | uninstall |
| anything else (403, 5xx, timeouts, node unreadable, ...)  | keep      |
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ambient_cni.node.targeting import targets_node

Policy = Literal["auto", "always", "never"]
POLICIES: tuple[Policy, ...] = ("auto", "always", "never")
Outcome = Literal["found", "not_found", "unauthorized", "error"]


@dataclass(frozen=True)
class Observation:
    """What the Kubernetes API said about our DaemonSet (and, when found, our node)."""

    outcome: Outcome
    daemonset: Mapping[str, Any] | None = None
    node: Mapping[str, Any] | None = None
    error: str = ""
    daemonset_ref: str = ""  # namespace/name, for the messages


@dataclass(frozen=True)
class StopDecision:
    uninstall: bool
    reason: str

    @property
    def action(self) -> str:
        return "uninstall" if self.uninstall else "keep"


def needs_api(policy: Policy) -> bool:
    return policy == "auto"


def decide(policy: Policy, observation: Observation | None) -> StopDecision:
    if policy == "always":
        return StopDecision(True, "--uninstall-on-stop always")
    if policy == "never":
        return StopDecision(False, "--uninstall-on-stop never")
    if observation is None:
        return StopDecision(False, "no Kubernetes API to ask; keeping everything (safe default)")
    ref = observation.daemonset_ref or "our DaemonSet"
    if observation.outcome == "not_found":
        return StopDecision(True, f"DaemonSet {ref} not found: it was deleted")
    if observation.outcome == "unauthorized":
        return StopDecision(True, "the API server answered 401 Unauthorized: our service account was removed")
    if observation.outcome == "error" or observation.daemonset is None:
        why = observation.error or "no answer"
        return StopDecision(False, f"cannot tell whether {ref} still runs here ({why}); keeping everything")
    if (observation.daemonset.get("metadata") or {}).get("deletionTimestamp"):
        return StopDecision(True, f"DaemonSet {ref} is being deleted")
    if observation.node is None:
        return StopDecision(False, f"DaemonSet {ref} exists but this node could not be read; keeping everything")
    targets, why_not = targets_node(observation.daemonset, observation.node)
    if not targets:
        return StopDecision(True, f"DaemonSet {ref} no longer targets this node: {why_not}")
    return StopDecision(False, f"DaemonSet {ref} exists and targets this node: restart or upgrade")
