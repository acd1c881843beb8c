"""CNI error codes (SPEC 1.1.0 + our own 100+ range) and the exception that carries them."""

from __future__ import annotations

INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENV = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
STATUS_UNAVAILABLE = 50
STATUS_IMPAIRED = 51

# Our own codes (documented in docs/errors.md).
AGENT_FAILURE = 100  # the agent answered with a failure it did not classify
REDIRECTION_FAILED = 101  # the agent could not put redirection in place (bad netns, rules, ztunnel nack)
INTERNAL_ERROR = 102  # an unexpected failure inside the plugin (a bug): never a traceback on stdout
PROTOCOL_ERROR = 103  # the agent's reply broke the wire protocol


class CniError(Exception):
    """A failure reported to the runtime as one CNI error object on stdout."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_json_obj(self, cni_version: str) -> dict[str, object]:
        return {"cniVersion": cni_version, "code": self.code, "msg": self.msg, "details": self.details}
