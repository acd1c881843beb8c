"""Running iptables-save / iptables-restore in the calling thread's network namespace.

Call these only from a thread that has joined the pod netns (``netns.run_in_netns``): the child process
inherits the thread's namespace. The rules themselves come from ``rules.py``.

Cost (docs/performance.md): the execs are the largest share of an enrolled ADD. So a fresh pod gets one
``iptables-restore`` per family and no ``iptables-save`` (``rules.first_install_input``), the families' restores
run at once, the binaries are looked up in PATH once per process, and a child's exit is awaited on a pidfd
(``_Child``) instead of the library's sleep-polling wait.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import IO

from nodeagent.dataplane import rules
from nodeagent.dataplane.rules import DEFAULT_VARIANT, Family, RuleParams, Variant

TIMEOUT_S = 10.0
_MAX_PIPED_INPUT = 60_000  # below the pipe buffer (64 KiB): written before the exec, never blocks; else a file

_paths: dict[str, str] = {}


class IptablesError(Exception):
    pass


def _resolve(name: str) -> str:
    """Absolute path of ``name`` (cached once found): saves the exec attempts along PATH on every call."""
    path = _paths.get(name)
    if path is None:
        path = shutil.which(name)
        if path is None:
            return name  # not installed (yet): the exec reports it
        _paths[name] = path
    return path


class _Child:
    """One iptables-save/-restore, started at construction; ``finish()`` collects it.

    Not ``subprocess.run(timeout=...)``: with a timeout, ``communicate`` ends in ``Popen.wait(timeout)``, which
    polls with sleeps from 1 ms, and since stderr's EOF comes just before the exit, nearly every exec paid that
    sleep (measured, docs/performance.md). The exit is awaited on a pidfd instead, under the same timeout.
    """

    def __init__(self, argv: list[str], data: bytes | None = None) -> None:
        self.argv = argv
        with contextlib.ExitStack() as cleanup:  # the parent's copy of stdin is closed once the child has it
            stdin = subprocess.DEVNULL if data is None else self._stdin(data, cleanup)
            try:
                self.proc = subprocess.Popen(
                    [_resolve(argv[0]), *argv[1:]], stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE
                )
            except FileNotFoundError:
                raise IptablesError(f"{argv[0]} is not installed") from None
        self.deadline = time.monotonic() + TIMEOUT_S

    @staticmethod
    def _stdin(data: bytes, cleanup: contextlib.ExitStack) -> int | IO[bytes]:
        if len(data) <= _MAX_PIPED_INPUT:
            read_end, write_end = os.pipe()
            cleanup.callback(os.close, read_end)
            try:
                os.write(write_end, data)  # fits the empty pipe buffer: never blocks
            finally:
                os.close(write_end)
            return read_end
        spill = cleanup.enter_context(tempfile.TemporaryFile())  # noqa: SIM115 (the ExitStack closes it)
        spill.write(data)
        spill.seek(0)
        return spill

    def finish(self) -> tuple[int, str, str]:
        """(exit code, stdout, stderr); raises IptablesError past the timeout (the child is killed)."""
        assert self.proc.stdout is not None and self.proc.stderr is not None
        out_fd, err_fd = self.proc.stdout.fileno(), self.proc.stderr.fileno()
        chunks: dict[int, list[bytes]] = {out_fd: [], err_fd: []}
        try:
            pidfd = os.pidfd_open(self.proc.pid)
        except OSError:  # kernel < 5.3: the library's way
            try:
                raw_out, raw_err = self.proc.communicate(timeout=max(0.0, self.deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._kill()
                raise
            return self.proc.returncode, raw_out.decode(errors="replace"), raw_err.decode(errors="replace")
        try:
            poller = select.poll()
            pending = {out_fd, err_fd, pidfd}
            for fd in pending:
                poller.register(fd, select.POLLIN)
            while pending:
                left = self.deadline - time.monotonic()
                if left <= 0:
                    self._kill()
                for fd, _ in poller.poll(left * 1000):
                    data = os.read(fd, 65536) if fd != pidfd else b""
                    if data:
                        chunks[fd].append(data)
                    else:  # EOF on a pipe, or the child exited
                        poller.unregister(fd)
                        pending.discard(fd)
        finally:
            os.close(pidfd)
            self.proc.stdout.close()
            self.proc.stderr.close()
        code = self.proc.wait()  # it has exited: no polling
        out, err = (b"".join(chunks[fd]).decode(errors="replace") for fd in (out_fd, err_fd))
        return code, out, err

    def _kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        raise IptablesError(f"{self.argv[0]} did not finish within {TIMEOUT_S:.0f} s")


def _run(argv: list[str], stdin: str | None = None) -> str:
    code, out, err = _Child(argv, None if stdin is None else stdin.encode()).finish()
    if code != 0:
        detail = (err or out).strip().replace("\n", "; ")
        raise IptablesError(f"{' '.join(argv)} failed (exit {code}): {detail}")
    return out


def save(family: Family, table: str | None = None) -> str:
    argv = [family.save_cmd]
    if table:
        argv += ["-t", table]
    return _run(argv)


def restore(family: Family, text: str) -> None:
    if text:
        _run([family.restore_cmd, "--noflush"], stdin=text)


def install(family: Family, params: RuleParams = rules.DEFAULT_PARAMS, variant: Variant = DEFAULT_VARIANT) -> None:
    """Install (or refresh) our chains for ``variant`` for one family (see ``install_families``)."""
    install_families([family], params, variant)


def install_families(
    families: Sequence[Family],
    params: RuleParams = rules.DEFAULT_PARAMS,
    variant: Variant = DEFAULT_VARIANT,
    meanwhile: Callable[[], None] | None = None,
) -> None:
    """Install (or refresh) our chains for ``variant`` in every family: one iptables-restore each, one
    transaction per table.

    All families' restores start at once with ``rules.first_install_input`` (no ``iptables-save`` before);
    ``meanwhile`` (e.g. the policy routes) runs in this thread while they work. A restore refuses when our
    chains exist already (a re-add, a variant change, a repair, drift): that family then takes the general path,
    its current ``iptables-save`` -> ``rules.install_input`` -> restore, which is idempotent and removes another
    variant's chains. Any other failure fails there too and is raised. Raises IptablesError, or what
    ``meanwhile`` raised (after every child has exited).
    """
    started: dict[Family, _Child] = {}
    try:
        for fam in families:
            text = rules.first_install_input(fam, params, variant)
            started[fam] = _Child([fam.restore_cmd, "--noflush"], text.encode())
        if meanwhile is not None:
            meanwhile()
    finally:
        done = {fam for fam, child in started.items() if child.finish()[0] == 0}
    for fam in families:
        if fam not in done:
            restore(fam, rules.install_input(fam, save(fam), params, variant))


def remove(family: Family) -> bool:
    """Remove our jumps and chains if present. Returns whether anything was removed."""
    text = rules.removal_input(save(family))
    restore(family, text)
    return bool(text)
