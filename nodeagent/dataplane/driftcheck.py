"""Checking and repairing one pod's redirection, in the calling thread's network namespace.

``check_here`` is the periodic, cheap path. The policy routing is read over netlink (no fork). For the
iptables side it asks the netns's nf_tables generation first: when it equals the generation recorded the last
time the rules were found as expected, no rule in that netns has changed since and nothing is forked. Otherwise
(first check, any change, or an iptables that is not the nf_tables variant) it runs one ``iptables-save`` per
family and compares with the expected set. So a pass over healthy pods forks nothing, and a changed pod costs
one ``iptables-save`` per family.

``converge_here`` repairs: guardrails first (``guardrails.py``), then our rules and routes out and in again,
then a verification, and only then the guardrails are lifted. Anything failing on the way raises and leaves
the guardrails in place.
"""

from __future__ import annotations

import functools
import subprocess
from collections.abc import Callable

from nodeagent.dataplane import drift, guardrails, iptables, nlprobe
from nodeagent.dataplane.drift import RouteFacts
from nodeagent.dataplane.rules import Family, RuleParams, Variant


class RepairError(Exception):
    """The rewrite did not converge; the pod stays behind its guardrails."""


@functools.lru_cache(maxsize=1)
def iptables_is_nft() -> bool:
    """Whether ``iptables`` is the nf_tables variant (then the nf_tables generation covers every rule change)."""
    try:
        out = subprocess.run(["iptables", "-V"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "nf_tables" in out


def route_facts(families: list[Family], p: RuleParams) -> dict[Family, RouteFacts]:
    out = {}
    for family in families:
        want = (p.route_table, p.connmark, p.mask, p.rule_priority)
        rules = nlprobe.fwmark_rules(family.value, p.route_table)
        out[family] = RouteFacts(
            rule=want in rules, route=nlprobe.local_default_route(family.value, p.route_table)
        )
    return out


def saves_here(families: list[Family]) -> dict[Family, str]:
    return {family: iptables.save(family) for family in families}


def check_here(
    families: list[Family], p: RuleParams, variant: Variant, known_generation: int | None
) -> tuple[list[str], int | None]:
    """(drift, generation to remember). The generation is read *before* the rules, so a change racing with the
    read is seen at the latest by the next check; it is only remembered when no drift was found."""
    generation = nlprobe.nft_generation() if iptables_is_nft() else None
    unchanged = generation is not None and generation == known_generation
    saves = None if unchanged else saves_here(families)
    problems = drift.find_drift(saves, route_facts(families, p), p, variant)
    return problems, (generation if not problems else None)


def converge_here(
    families: list[Family],
    p: RuleParams,
    variant: Variant,
    install: Callable[[], None],
    remove: Callable[[], None],
) -> list[str]:
    """Repair drift under guardrails; returns the drift that was found (empty: nothing was touched).
    ``remove`` takes every rule and route of ours out, ``install`` puts the pod's variant back."""
    saves = saves_here(families)
    problems = drift.find_drift(saves, route_facts(families, p), p, variant)
    if not problems:
        return []
    for family in families:
        iptables.restore(family, guardrails.install_input(saves[family]))
    remove()
    install()
    after = saves_here(families)
    leftover = drift.rule_drift(after, p, variant) + drift.route_drift(route_facts(families, p), p)
    if leftover:
        raise RepairError("rules still differ after the rewrite (guardrails kept): " + "; ".join(leftover[:5]))
    for family in families:
        iptables.restore(family, guardrails.lift_input(after[family]))
    return problems
