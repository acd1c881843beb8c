"""DROP guardrails that keep a pod's traffic from flowing unredirected while its rules are rewritten (pure).

While the reconciler repairs drift it removes our rules and installs them again. In between, nothing would send
the pod's traffic to the proxy, so first every TCP and UDP packet the pod sends, receives or forwards is dropped
from the filter table (a jump at position 1 of INPUT, FORWARD and OUTPUT into ``AMBIENT_GUARD``), and only when
the rules are back and verified are the guardrails lifted. A repair that fails leaves them in place: the pod
is cut off (fail closed) until a later pass completes the repair.

Both inputs are for ``iptables-restore --noflush`` and are one transaction (one ``COMMIT``) each.
"""

from __future__ import annotations

from nodeagent.dataplane.rules import parse_save

GUARD_CHAIN = "AMBIENT_GUARD"
GUARDED_CHAINS = ("INPUT", "FORWARD", "OUTPUT")
GUARD_RULES = (f"-A {GUARD_CHAIN} -p tcp -j DROP", f"-A {GUARD_CHAIN} -p udp -j DROP")


def _jump(chain: str) -> str:
    return f"-A {chain} -j {GUARD_CHAIN}"


def _filter_lines(existing_save: str) -> list[str]:
    return parse_save(existing_save).get("filter", [])


def present(existing_save: str) -> bool:
    """Whether guardrails (the chain or a jump to it) are in the netns's filter table."""
    lines = _filter_lines(existing_save)
    return any(ln.startswith(f":{GUARD_CHAIN} ") for ln in lines) or any(
        ln == _jump(chain) for ln in lines for chain in GUARDED_CHAINS
    )


def install_input(existing_save: str) -> str:
    """Guardrails at position 1 of every guarded chain (earlier copies removed first, so exactly one each)."""
    have = _filter_lines(existing_save)
    out = ["*filter", f":{GUARD_CHAIN} - [0:0]"]
    for chain in GUARDED_CHAINS:
        out.extend(f"-D {chain} -j {GUARD_CHAIN}" for _ in range(have.count(_jump(chain))))
        out.append(f"-I {chain} 1 -j {GUARD_CHAIN}")
    out.extend(GUARD_RULES)
    out.append("COMMIT")
    return "\n".join(out) + "\n"


def lift_input(existing_save: str) -> str:
    """Remove every jump to the guardrails and the chain (only what exists), or "" when there is nothing."""
    have = _filter_lines(existing_save)
    body = [f"-D {chain} -j {GUARD_CHAIN}" for chain in GUARDED_CHAINS for _ in range(have.count(_jump(chain)))]
    if any(ln.startswith(f":{GUARD_CHAIN} ") for ln in have):
        body += [f"-F {GUARD_CHAIN}", f"-X {GUARD_CHAIN}"]
    return "\n".join(["*filter", *body, "COMMIT"]) + "\n" if body else ""
