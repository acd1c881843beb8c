"""Drift: how a pod netns's redirection differs from the expected set (pure: facts in, problems out).

The expected iptables lines come from ``rules.expected_rules`` through ``rules.diff_rules`` for the pod's own
variant (order-insensitive, duplicates count), so every rule variant the generator knows is checked the same
way, and rules of another variant (e.g. after the pod's annotations changed) are drift. The policy routing is
checked from netlink facts. Guardrails left in the filter table (a repair that did not finish) are drift too.
An empty list means "as expected".
"""

from __future__ import annotations

from dataclasses import dataclass

from nodeagent.dataplane import guardrails, rules
from nodeagent.dataplane.rules import DEFAULT_PARAMS, DEFAULT_VARIANT, Family, RuleParams, Variant


@dataclass(frozen=True)
class RouteFacts:
    """What netlink says about one family's policy routing in the netns."""

    rule: bool  # fwmark <connmark>/<mask> lookup <table> at the expected priority
    route: bool  # local default dev lo in <table>


def tool(family: Family) -> str:
    return "iptables" if family is Family.V4 else "ip6tables"


def rule_drift(
    saves: dict[Family, str], p: RuleParams = DEFAULT_PARAMS, variant: Variant = DEFAULT_VARIANT
) -> list[str]:
    problems: list[str] = []
    for family, text in saves.items():
        for diff in rules.diff_rules(text, family, p, variant):
            problems += [f"{tool(family)} -t {diff.table}: missing  {line}" for line in diff.missing]
            problems += [f"{tool(family)} -t {diff.table}: extra    {line}" for line in diff.extra]
    return problems


def guard_drift(saves: dict[Family, str]) -> list[str]:
    return [f"{tool(family)} -t filter: guardrails still in place ({guardrails.GUARD_CHAIN})"
            for family, text in saves.items() if guardrails.present(text)]


def route_drift(routes: dict[Family, RouteFacts], p: RuleParams = DEFAULT_PARAMS) -> list[str]:
    problems: list[str] = []
    for family, facts in routes.items():
        ip = "ip" if family is Family.V4 else "ip -6"
        if not facts.rule:
            problems.append(f"{ip} rule: missing  fwmark {p.connmark:#x}/{p.mask:#x} lookup {p.route_table}")
        if not facts.route:
            problems.append(f"{ip} route table {p.route_table}: missing  local default dev lo")
    return problems


def find_drift(
    saves: dict[Family, str] | None,
    routes: dict[Family, RouteFacts],
    p: RuleParams = DEFAULT_PARAMS,
    variant: Variant = DEFAULT_VARIANT,
) -> list[str]:
    """``saves`` None: the iptables side is known unchanged since it was last found as expected."""
    problems = rule_drift(saves, p, variant) + guard_drift(saves) if saves is not None else []
    return problems + route_drift(routes, p)
