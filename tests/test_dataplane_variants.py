"""Every redirection variant and the node-side probe rules, against golden files (tests/golden/dataplane/).

Kinds of golden per variant and family:
- ``<variant>_v4.restore`` / ``_v6.restore``: the ``iptables-restore --noflush`` input the generator writes for a
  clean netns (pure: runs without root);
- ``<variant>_v4.switch`` / ``.remove`` (pure too): the input it writes over the real ``iptables-save`` of the
  seed's rules (a variant change) and over the variant's own (its removal);
- ``<variant>_v4.save`` / ``_v6.save``: what the real ``iptables-save`` prints after that input was applied in a
  fresh netns (comment lines dropped and counters zeroed, nothing else touched). The default variant's are the
  seed's own text (``seed_iptables_save.txt``, ``ip6tables_save.txt``).
The node side: ``host_v4``/``host_v6`` the same way (``.restore``, ``.save``, and over the ``.save``: ``.repair``,
``.remove``), applied by ``HostProbe`` in a fresh "node" netns.
``REFRESH_GOLDEN=1`` rewrites the files but the seed's (review the diff; ``tests/goldens.py``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

import netns_threads
from nodeagent.dataplane import hostrules, iptables, rules
from nodeagent.dataplane.hostprobe import HostProbe
from nodeagent.dataplane.rules import Family, RedirectMode, Variant
from testbed.netns import Netns
from tests import goldens

VIFS = ("fake1s0f0", "fake1s0f1")
T, R = RedirectMode.TPROXY, RedirectMode.REDIRECT
VARIANTS = [
    Variant(mode, dns, inbound, vif)
    for mode in (T, R)
    for dns, inbound, vif in (
        (False, True, ()),
        (True, True, ()),
        (False, False, ()),
        (True, False, ()),
        (False, True, VIFS),
        (False, False, VIFS),
        (True, False, VIFS),
    )
]
FAMILIES = [Family.V4, Family.V6]


def in_ns(ns: Netns, fn):  # type: ignore[no-untyped-def]
    fd = os.open(ns.path, os.O_RDONLY)
    try:
        return netns_threads.run_in_netns(fd, fn)
    finally:
        os.close(fd)


def golden_path(stem: str, family: Family, kind: str) -> Path:
    if kind == "save" and stem == "tproxy":  # the default: the seed's own iptables-save text
        return goldens.SEED_SAVE if family is Family.V4 else goldens.golden("dataplane", "ip6tables_save.txt")
    return goldens.golden("dataplane", "variants", f"{stem}_v{family.value}.{kind}")


def check_golden(path: Path, got: str) -> None:
    goldens.check(path, got, rules.normalise_save if path.name.endswith(".txt") else None)


def entry(ip: str) -> hostrules.SetEntry:
    made = hostrules.set_entry(ip)
    assert made is not None
    return made


def ids(v: Variant) -> str:
    return v.name


# -- pure: the generated iptables-restore input ------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f"v{f.value}")
@pytest.mark.parametrize("variant", VARIANTS, ids=ids)
def test_restore_input_golden(variant: Variant, family: Family) -> None:
    check_golden(golden_path(variant.name, family, "restore"), rules.install_input(family, "", variant=variant))


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f"v{f.value}")
@pytest.mark.parametrize("variant", VARIANTS, ids=ids)
def test_fresh_netns_input_is_the_golden_with_chains_created(variant: Variant, family: Family) -> None:
    """A fresh pod's single restore (``first_install_input``) is the golden input with each ``:CHAIN - [0:0]``
    declaration turned into ``-N CHAIN`` (refused when the chain exists): the same tables and rules, byte for
    byte, for every variant."""
    golden = goldens.read(golden_path(variant.name, family, "restore"))
    expected = "".join(f"-N {ln[1:].split()[0]}\n" if ln.startswith(":ISTIO") else f"{ln}\n"
                       for ln in golden.splitlines())
    assert rules.first_install_input(family, variant=variant) == expected


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f"v{f.value}")
@pytest.mark.parametrize("variant", VARIANTS, ids=ids)
def test_switch_input_golden(variant: Variant, family: Family) -> None:
    """The input that turns a pod holding the seed's rules (the real ``iptables-save`` golden) into ``variant``:
    what the agent restores when a pod's annotations change its variant (for the seed's own variant: nothing
    but the chain declarations, an idempotent re-install)."""
    seed_save = goldens.read(golden_path(rules.DEFAULT_VARIANT.name, family, "save"))
    check_golden(golden_path(variant.name, family, "switch"), rules.install_input(family, seed_save, variant=variant))


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f"v{f.value}")
@pytest.mark.parametrize("variant", VARIANTS, ids=ids)
def test_removal_input_golden(variant: Variant, family: Family) -> None:
    """The input that removes ``variant``'s rules from a pod holding them (its real ``iptables-save`` golden):
    every jump deleted, every chain of ours flushed and deleted, nothing else named."""
    save = goldens.read(golden_path(variant.name, family, "save"))
    removal = rules.removal_input(save)
    check_golden(golden_path(variant.name, family, "remove"), removal)
    assert rules.removal_input("") == "" and all(ln.startswith(("*", "-D ", "-F ", "-X ", "COMMIT"))
                                                   for ln in removal.splitlines())


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f"v{f.value}")
def test_host_restore_input_golden(family: Family) -> None:
    check_golden(golden_path("host", family, "restore"), hostrules.host_install_input(family, ""))


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f"v{f.value}")
def test_host_repair_and_removal_input_golden(family: Family) -> None:
    """The node side over its real ``iptables-save`` golden: nothing to repair (the jump is first and unique,
    so no ``-D``/``-I``), and the removal input."""
    save = goldens.read(golden_path("host", family, "save"))
    repair = hostrules.host_install_input(family, save)
    assert "-D " not in repair and "-I " not in repair
    check_golden(golden_path("host", family, "repair"), repair)
    check_golden(golden_path("host", family, "remove"), hostrules.host_removal_input(save))


def test_variant_names_are_unique_and_default_is_the_seed() -> None:
    assert len({v.name for v in VARIANTS}) == len(VARIANTS)
    assert rules.DEFAULT_VARIANT.name == "tproxy"
    text = rules.install_input(Family.V4, "")
    assert "*raw" not in text and "15053" not in text and text.count("COMMIT") == 2


@pytest.mark.parametrize("bad", ["eth0 -j ACCEPT", "eth0\n-A OUTPUT -j ACCEPT", "0eth", "a" * 16, "-i", ""])
def test_interface_names_never_reach_iptables_unchecked(bad: str) -> None:
    with pytest.raises(ValueError):
        Variant(R, reroute_interfaces=(bad,))


@pytest.mark.parametrize("variant", VARIANTS, ids=ids)
def test_detect_variant(variant: Variant) -> None:
    save = "".join(
        f"*{t}\n" + "".join(f":{c} - [0:0]\n" for c in rules.chains_of(t, variant)) + "\n".join(lines) + "\nCOMMIT\n"
        for t, lines in rules.expected_rules(Family.V4, variant=variant).items()
    )
    found = rules.detect_variant(save)
    assert found is not None
    # without inbound capture, the interfaces' rules are the same in both modes
    assert rules.expected_rules(Family.V4, variant=found) == rules.expected_rules(Family.V4, variant=variant)


def test_diff_is_variant_aware() -> None:
    dns = Variant(T, dns_capture=True)
    save = "".join(
        f"*{t}\n" + "\n".join(lines) + "\nCOMMIT\n" for t, lines in rules.expected_rules(Family.V4, variant=dns).items()
    )
    assert all(d.ok for d in rules.diff_rules(save, Family.V4, variant=dns))
    plain = {d.table: d for d in rules.diff_rules(save, Family.V4)}  # the default has no DNS rules
    assert len(plain["raw"].extra) == 4 and not plain["raw"].missing
    assert any("--to-ports 15053" in r for r in plain["nat"].extra)
    redirect = {d.table: d for d in rules.diff_rules(save, Family.V4, variant=Variant(R, dns_capture=True))}
    assert any("-j TPROXY" in r for r in redirect["mangle"].extra)
    assert any("--to-ports 15006" in r for r in redirect["nat"].missing)


def test_host_input_puts_the_jump_first_and_once() -> None:
    jump, rule = hostrules.HOST_JUMP, hostrules.host_chain_rule(Family.V4)
    fine = f"*nat\n:ISTIO_POSTRT - [0:0]\n{jump}\n-A POSTROUTING -j MASQUERADE\n{rule}\nCOMMIT\n"
    assert hostrules.host_diff(fine, Family.V4).ok
    assert "-I POSTROUTING" not in hostrules.host_install_input(Family.V4, fine)
    behind = f"*nat\n-A POSTROUTING -j MASQUERADE\n{jump}\n{jump}\n{rule}\nCOMMIT\n"
    diff = hostrules.host_diff(behind, Family.V4)
    assert diff.misplaced == [jump] and diff.extra == [jump]
    text = hostrules.host_install_input(Family.V4, behind)
    assert text.count("-D POSTROUTING -j ISTIO_POSTRT") == 2 and "-I POSTROUTING 1 -j ISTIO_POSTRT" in text


def test_set_entries_unmap_and_skip_non_pod_addresses() -> None:
    entries = hostrules.entries_of(["10.1.0.5/24", "::ffff:10.1.0.6", "fd00::7/64", "fe80::1/64", "127.0.0.1", "x"])
    assert [(e.version, e.ip) for e in entries] == [(4, "10.1.0.5"), (4, "10.1.0.6"), (6, "fd00::7")]


def test_plan_sync_upserts_prunes_and_skips_prune_when_an_ip_is_unknown() -> None:
    e = entry
    current = {e("10.0.0.1"): "uid-a", e("10.0.0.2"): "uid-old", e("10.0.0.3"): "uid-x"}
    plan = hostrules.plan_sync(current, [("uid-a", ["10.0.0.1/24"]), ("uid-b", ["10.0.0.3/24"])], prune=True)
    assert plan.add == [(e("10.0.0.3"), "uid-b")]  # IP reused by a newer pod: its UID wins
    assert plan.delete == [(e("10.0.0.2"), "uid-old")]
    unknown = hostrules.plan_sync(current, [("uid-a", ["10.0.0.1"]), ("uid-c", [])], prune=True)
    assert unknown.delete == [] and unknown.prune_skipped
    assert hostrules.plan_sync(current, [("uid-a", ["10.0.0.1"])], prune=False).delete == []
    # two enrolled pods claim one IP: the later one (the newer pod) owns the entry
    both = hostrules.plan_sync({}, [("uid-old", ["10.0.0.9"]), ("uid-new", ["10.0.0.9"])], prune=True)
    assert both.add == [(e("10.0.0.9"), "uid-new")]


# -- real: what iptables-save prints -----------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f"v{f.value}")
@pytest.mark.parametrize("variant", VARIANTS, ids=ids)
def test_save_golden(netns_factory: Callable[..., Netns], variant: Variant, family: Family) -> None:
    ns = netns_factory()
    in_ns(ns, lambda: iptables.install(family, variant=variant))
    got = rules.normalise_save(ns.iptables_save(family is Family.V6))
    check_golden(golden_path(variant.name, family, "save"), got)
    assert all(d.ok for d in rules.diff_rules(got, family, variant=variant))
    in_ns(ns, lambda: iptables.install(family, variant=variant))  # idempotent
    assert rules.normalise_save(ns.iptables_save(family is Family.V6)) == got


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f"v{f.value}")
def test_variant_change_leaves_only_the_new_variant(netns_factory: Callable[..., Netns], family: Family) -> None:
    ns = netns_factory()
    v6 = family is Family.V6
    ns.run("ip6tables" if v6 else "iptables", "-t", "raw", "-A", "OUTPUT", "-p", "udp", "-j", "ACCEPT")  # foreign
    in_ns(ns, lambda: iptables.install(family, variant=Variant(R, True, False, VIFS)))
    in_ns(ns, lambda: iptables.install(family))  # back to the seed's rules
    got = rules.normalise_save(ns.iptables_save(v6))
    assert "-A OUTPUT -p udp -j ACCEPT" in got
    assert all(d.ok for d in rules.diff_rules(got, family))
    seed = goldens.read(golden_path("tproxy", family, "save"), rules.normalise_save)
    ours = "\n".join(ln for ln in got.splitlines() if "ISTIO" in ln)
    assert ours == "\n".join(ln for ln in seed.splitlines() if "ISTIO" in ln)
    assert in_ns(ns, lambda: iptables.remove(family)) is True
    assert "ISTIO" not in ns.iptables_save(v6)


def test_both_families_at_once_switching_variants_both_ways(netns_factory: Callable[..., Netns]) -> None:
    """The agent's install (both families' restores at once): the seed's rules in a fresh netns (one restore per
    family), then a variant with more tables (refused by the existing chains: the general path adds the raw
    table), then back (the general path removes it); each time ``iptables-save`` equals that variant's golden."""
    ns = netns_factory()
    more = Variant(R, True, False, VIFS)  # nat ISTIO_PRERT and the raw table, absent from the seed's rules
    for variant in (rules.DEFAULT_VARIANT, more, rules.DEFAULT_VARIANT):
        in_ns(ns, lambda v=variant: iptables.install_families(FAMILIES, variant=v))
        for family in FAMILIES:
            got = rules.normalise_save(ns.iptables_save(family is Family.V6))
            want = goldens.read(golden_path(variant.name, family, "save"), rules.normalise_save)
            assert [ln for ln in got.splitlines() if "ISTIO" in ln] == [
                ln for ln in want.splitlines() if "ISTIO" in ln], (variant.name, family)
            assert all(d.ok for d in rules.diff_rules(got, family, variant=variant))


def test_host_save_golden(netns_factory: Callable[..., Netns]) -> None:
    node = netns_factory()
    probe = HostProbe(node.path)
    try:
        assert probe.families == [Family.V4, Family.V6]
        probe.start()
        for family in FAMILIES:
            got = rules.normalise_save(node.iptables_save(family is Family.V6))
            check_golden(golden_path("host", family, "save"), got)
        # a foreign rule inserted in front of ours: the next start/sync moves ours back to position 1
        node.run("iptables", "-t", "nat", "-I", "POSTROUTING", "1", "-j", "ACCEPT")
        assert not hostrules.host_diff(node.iptables_save(), Family.V4).ok
        assert probe.sync([], prune=True).rules_repaired == ["v4"]
        assert node.iptables_save().split("-A POSTROUTING")[1].strip().startswith("-j ISTIO_POSTRT")
        assert probe.start() == []  # nothing to do: reused, never duplicated
        assert node.iptables_save().count("-A POSTROUTING -j ISTIO_POSTRT") == 1
        assert sorted(probe.uninstall()) == sorted(
            ["rules v4", "rules v6", "set istio-inpod-probes-v4", "set istio-inpod-probes-v6"]
        )
        assert "ISTIO" not in node.iptables_save() and "ISTIO" not in node.iptables_save(True)
        assert probe.entries() == {}
    finally:
        probe.close()


def test_doctor_probe_path_check_is_pure_and_names_each_problem() -> None:
    from nodeagent.dataplane import diagnose

    v4 = Family.V4
    host = {v4: f"*nat\n{hostrules.HOST_JUMP}\n{hostrules.host_chain_rule(v4)}\nCOMMIT\n"}
    pod_plain = {v4: "*nat\n" + "\n".join(rules.expected_rules(v4)["nat"]) + "\nCOMMIT\n"}
    ok = diagnose.check_probe_path(host, {entry("10.1.0.5"): "u1"}, ["10.1.0.5/24"], "u1",
                                   rules.DEFAULT_VARIANT, "the agent", pod_plain, "/run/netns/node")
    assert ok.status == diagnose.PASS, ok.problems
    chain_rule = hostrules.host_chain_rule(v4)
    moved = {v4: f"*nat\n-A POSTROUTING -j MASQUERADE\n{hostrules.HOST_JUMP}\n{chain_rule}\nCOMMIT\n"}
    bad = diagnose.check_probe_path(moved, {entry("10.1.0.5"): "u2"}, ["10.1.0.5/24"], "u1",
                                    Variant(dns_capture=True), "the agent", pod_plain, "/run/netns/node")
    assert bad.status == diagnose.FAIL
    assert any("is not the first POSTROUTING rule" in p for p in bad.problems)
    assert any("belongs to pod uid u2, not u1" in p for p in bad.problems)
    assert any("DNS capture is on for the pod but" in p for p in bad.problems)
    unknown = diagnose.check_probe_path(None, None, [], "u1", rules.DEFAULT_VARIANT, "x", pod_plain, "")
    assert unknown.status == diagnose.SKIP and "use --host-netns" in unknown.problems[-1]
