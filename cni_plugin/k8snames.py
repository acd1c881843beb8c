"""Kubernetes pod identity in CNI_ARGS, checked the way Kubernetes checks it (pure; no ``re``, ~8 ms per exec).

The runtime passes ``K8S_POD_NAMESPACE``, ``K8S_POD_NAME``, ``K8S_POD_UID`` and ``K8S_POD_INFRA_CONTAINER_ID``.
They name files (``<run_dir>/pods/<namespace>_<name>``), wire fields and log lines, so nothing else may pass:

- namespace: a DNS-1123 label, ``[a-z0-9]([-a-z0-9]*[a-z0-9])?``, at most 63 characters;
- name: a DNS-1123 subdomain, dot-separated DNS-1123 labels, at most 253 characters;
- uid: what the API server (an RFC 4122 UUID) or the kubelet (32 hex digits for a static pod) assigns; accepted
  as ``[A-Za-z0-9]`` followed by ``[A-Za-z0-9_.-]``, at most 128 characters;
- infra container id: libcni's container-id rule ``[A-Za-z0-9][A-Za-z0-9_.-]*``, at most 128 characters.

An empty value means "not given" and is accepted (a pod without name or namespace is not a Kubernetes pod).
None of the accepted forms contains ``/``, ``_`` in a namespace, NUL, a non-ASCII character or a lone surrogate
(the escape for non-UTF-8 bytes in the environment), so ``<namespace>_<name>`` is one path component and
distinct pods never share it. ``is_text`` tells whether any other string can be encoded (reach a file, the
wire, a log) and ``shown`` quotes a bad value for a message.
"""

from __future__ import annotations

NAMESPACE_KEY = "K8S_POD_NAMESPACE"
NAME_KEY = "K8S_POD_NAME"
UID_KEY = "K8S_POD_UID"
INFRA_CONTAINER_ID_KEY = "K8S_POD_INFRA_CONTAINER_ID"

MAX_LABEL = 63
MAX_SUBDOMAIN = 253
MAX_UID = 128
MAX_CONTAINER_ID = 128

_LOWER_ALNUM = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")
_LABEL_CHARS = _LOWER_ALNUM | frozenset("-")
_ALNUM = _LOWER_ALNUM | frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_ID_CHARS = _ALNUM | frozenset("_.-")


def is_dns1123_label(value: str) -> bool:
    return (
        0 < len(value) <= MAX_LABEL
        and value[0] in _LOWER_ALNUM
        and value[-1] in _LOWER_ALNUM
        and all(c in _LABEL_CHARS for c in value)
    )


def is_dns1123_subdomain(value: str) -> bool:
    return 0 < len(value) <= MAX_SUBDOMAIN and all(is_dns1123_label(part) for part in value.split("."))


def is_identifier(value: str, limit: int | None = None) -> bool:
    """libcni's identifier rule ``[A-Za-z0-9][A-Za-z0-9_.-]*`` (container IDs, network names), without ``re``;
    at most ``limit`` characters when given."""
    return (bool(value) and (limit is None or len(value) <= limit) and value[0] in _ALNUM
            and all(c in _ID_CHARS for c in value))


def is_uid(value: str) -> bool:
    return is_identifier(value, MAX_UID)


def is_container_id(value: str) -> bool:
    return is_identifier(value, MAX_CONTAINER_ID)


_RULES = (
    (NAMESPACE_KEY, is_dns1123_label, f"a DNS-1123 label: lower-case letters, digits and '-', at most {MAX_LABEL}"),
    (NAME_KEY, is_dns1123_subdomain,
     f"a DNS-1123 subdomain: lower-case letters, digits, '-' and '.', at most {MAX_SUBDOMAIN}"),
    (UID_KEY, is_uid, f"a pod UID: letters, digits, '-', '_' and '.', at most {MAX_UID}"),
    (INFRA_CONTAINER_ID_KEY, is_container_id,
     f"a container ID: letters, digits, '-', '_' and '.', at most {MAX_CONTAINER_ID}"),
)


def pod_problem(namespace: str, name: str, uid: str, infra_container_id: str) -> tuple[str, str] | None:
    """The first field that Kubernetes would not have produced, as ``(key, message)``; None when all are fine.

    Empty fields are accepted (not given)."""
    for (key, valid, rule), value in zip(_RULES, (namespace, name, uid, infra_container_id), strict=True):
        if value and not valid(value):
            return key, f"{key} {shown(value)} is not {rule} characters"
    return None


def is_pod_name_pair(namespace: str, name: str) -> bool:
    """Both given and valid: what a hint file name or a cluster-view key needs."""
    return is_dns1123_label(namespace) and is_dns1123_subdomain(name)


def is_text(value: str) -> bool:
    """Encodable as UTF-8: false for the lone surrogates that stand for non-UTF-8 bytes in the environment
    (``surrogateescape``) or come from ``\\udXXX`` escapes in JSON. Such strings fail any encoder later."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def shown(value: str, limit: int = 80) -> str:
    """``value`` quoted for a message (``repr``: non-UTF-8 bytes show as ``\\udcNN`` escapes, never as lone
    surrogates that a JSON encoder would pass on), cut at ``limit`` characters."""
    if len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} characters)"
    return repr(value)
