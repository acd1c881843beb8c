"""``ambient-cni install`` and ``ambient-cni uninstall``. Every flag is also read from ``AMBIENT_CNI_<FLAG>``."""

from __future__ import annotations

import logging
from typing import Any

import click

from cli_options import DISABLED, EXEMPTION_OPTIONS, apply_options, comma_list, option
from cni_plugin import defaults, rundir
from conflist import logs
from conflist.chain import plugin_entry
from conflist.discover import CONTAINERD_CONFIG, CRIO_CONFIG, resolve_dirs
from conflist.installer import DEFAULT_OWNED_NAME, Installer, InstallError, Options

log = logging.getLogger("ambient_cni.install")

# Options of install and uninstall alike, in help order.
COMMON_OPTIONS: list[Any] = [
    option("--conf-dir", default=None, help="CNI conf dir [containerd/CRI-O config, else /etc/cni/net.d]"),
    option("--bin-dir", default=None, help="CNI bin dir [containerd/CRI-O config, else /opt/cni/bin]"),
    option("--mode", type=click.Choice(["owned", "inplace"]), default="owned", show_default=True,
           help="owned: write our own first-sorting conflist; inplace: edit the primary file"),
    option("--owned-file-name", default=DEFAULT_OWNED_NAME, show_default=True,
           help="Name of the owned conflist (a fallback that sorts first is used if needed)"),
    option("--run-dir", default=defaults.RUN_DIR, show_default=True,
           help="Agent run dir (plugin entry key run_dir); holds the readiness file by default"),
    option("--ready-file", default=None, help="Readiness file, present only while installed and valid "
           "[<run-dir>/install.ready]; '' or 'none' disables it"),
    option("--containerd-config", default=CONTAINERD_CONFIG, show_default=True,
           help="containerd config read for conf_dir/bin_dir"),
    option("--crio-config", default=CRIO_CONFIG, show_default=True,
           help="CRI-O config (and its .d drop-ins) read for network_dir/plugin_dirs"),
    option("--installer-log-level", type=click.Choice(["debug", "info", "warning", "error"]),
           default=defaults.LOG_LEVEL, show_default=True, help="Verbosity of the installer's own stderr log"),
]

# Everything `install` (watch mode) takes besides --once; `ambient-cni node` reuses this list.
INSTALL_OPTIONS: list[Any] = [
    *COMMON_OPTIONS,
    *EXEMPTION_OPTIONS,
    option("--deadline-ms", type=int, default=defaults.DEADLINE_MS, show_default=True,
           help="Plugin's bound on one agent round trip"),
    option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default=defaults.LOG_LEVEL,
           show_default=True, help="Plugin log level (plugin entry key log_level)"),
    option("--log-file", default=None, help='Plugin log file [<run-dir>/plugin.log]; "" or "none" disables it'),
    option("--file-mode", default="0600", show_default=True,
           help="Mode of the owned conflist (inplace keeps the primary's)"),
    option("--source", default=None,
           help="Plugin bundle dir to install [the running bundle, or dist/ambient-cni.bundle]"),
    option("--skip-binary", is_flag=True, default=False, help="Do not install or watch the plugin binary"),
    option("--default-cni-version", default=None,
           help="cniVersion for a primary that declares none (libcni would run it as 0.1.0, which cannot chain)"),
    option("--fight-limit", type=int, default=5, show_default=True,
           help="Repairs within --fight-window before warning and backing off"),
    option("--fight-window", type=float, default=10.0, show_default=True, help="Seconds (see --fight-limit)"),
    option("--fight-backoff", type=float, default=1.0, show_default=True,
           help="Seconds between repairs when fighting"),
]


def _ready_file(ready_file: str | None, run_dir: str) -> str | None:
    if ready_file is None:
        return rundir.install_ready_path(run_dir)
    return None if ready_file in ("", DISABLED) else ready_file


def _file_mode(value: str) -> int:
    try:
        mode = int(value, 8)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an octal mode like 0600", param_hint="--file-mode") from None
    if not 0 <= mode <= 0o777:
        raise click.BadParameter(f"{value!r} is out of range", param_hint="--file-mode")
    return mode


def build_entry(
    run_dir: str,
    exclude_namespaces: str,
    agent_pod_namespace: str,
    agent_pod_name_prefix: str,
    deadline_ms: int,
    log_level: str,
    log_file: str | None,
) -> dict[str, Any]:
    """Validate the plugin settings with the plugin's own model and return our conflist entry."""
    from pydantic import ValidationError

    from cni_plugin.config import PluginConfig

    values: dict[str, Any] = {
        "run_dir": run_dir,
        "exclude_namespaces": list(comma_list(exclude_namespaces)),
        "agent_pod_namespace": agent_pod_namespace,
        "agent_pod_name_prefix": agent_pod_name_prefix,
        "deadline_ms": deadline_ms,
        "log_level": log_level,
    }
    if log_file is not None:
        values["log_file"] = "" if log_file == DISABLED else log_file
    try:
        config = PluginConfig.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise click.UsageError(f"invalid plugin setting: {problems}") from None
    entry = plugin_entry(config.model_dump())
    assert entry["type"] == defaults.PLUGIN_NAME
    return entry


def install_options(kw: dict[str, Any]) -> Options:
    """The installer's ``Options`` from parsed INSTALL_OPTIONS (validated; UsageError/BadParameter if not)."""
    dirs = resolve_dirs(kw["conf_dir"], kw["bin_dir"], kw["containerd_config"], kw["crio_config"])
    entry = build_entry(kw["run_dir"], kw["exclude_namespaces"], kw["agent_pod_namespace"],
                        kw["agent_pod_name_prefix"], kw["deadline_ms"], kw["log_level"], kw["log_file"])
    if kw["default_cni_version"] is not None:
        from cni_plugin.versions import SUPPORTED_VERSIONS

        if kw["default_cni_version"] not in SUPPORTED_VERSIONS:
            raise click.BadParameter(f"must be one of {', '.join(SUPPORTED_VERSIONS)}",
                                     param_hint="--default-cni-version")
    if not kw["owned_file_name"].endswith(".conflist") or "/" in kw["owned_file_name"]:
        raise click.BadParameter("must be a plain file name ending in .conflist", param_hint="--owned-file-name")
    from conflist.binary import default_source

    options = Options(
        conf_dir=dirs.conf_dir,
        bin_dir=dirs.bin_dir,
        entry=entry,
        mode=kw["mode"],
        owned_file_name=kw["owned_file_name"],
        file_mode=_file_mode(kw["file_mode"]),
        source=None if kw["skip_binary"] else (kw["source"] or default_source()),
        ready_file=_ready_file(kw["ready_file"], kw["run_dir"]),
        default_cni_version=kw["default_cni_version"],
        verify_plugin=True,
    )
    log.info("conf_dir=%s bin_dir=%s (from %s) mode=%s", dirs.conf_dir, dirs.bin_dir, dirs.source, options.mode)
    return options


@click.command("install")
@apply_options(INSTALL_OPTIONS)
@option("--once", is_flag=True, default=False, help="One pass, then exit (0 when installed and valid)")
def install_cmd(**kw: Any) -> None:
    """Install the plugin binary and chain it into the node's conflist; watch and repair (default)."""
    logs.setup(kw["installer_log_level"])
    options = install_options(kw)
    installer = Installer(options)
    try:
        if kw["once"]:
            outcome = installer.run_pass(full_binary_check=True)
            if outcome.wrote or outcome.removed:
                log.info("wrote=%s removed=%s", ",".join(outcome.wrote) or "-", ",".join(outcome.removed) or "-")
            if not outcome.valid:
                raise click.ClickException(outcome.reason)
            log.info("installed and valid: config=%s primary=%s", outcome.config, outcome.primary)
            return
        from conflist.watch import Watcher

        watcher = Watcher(installer, fight_limit=kw["fight_limit"], fight_window_s=kw["fight_window"],
                          backoff_s=kw["fight_backoff"])
        watcher.install_signal_handlers()
        try:
            raise SystemExit(watcher.run())
        finally:
            watcher.close()
    except InstallError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")) from None
    except (click.ClickException, SystemExit, KeyboardInterrupt):
        raise
    except Exception as exc:
        raise click.ClickException(f"unexpected failure: {type(exc).__name__}: {exc}") from None


@click.command("uninstall")
@apply_options(COMMON_OPTIONS)
def uninstall_cmd(**kw: Any) -> None:
    """Remove the plugin from the conflist (owned file removed, inplace primary restored), then its binary."""
    logs.setup(kw["installer_log_level"])
    dirs = resolve_dirs(kw["conf_dir"], kw["bin_dir"], kw["containerd_config"], kw["crio_config"])
    options = Options(
        conf_dir=dirs.conf_dir,
        bin_dir=dirs.bin_dir,
        entry={"type": defaults.PLUGIN_NAME},
        mode=kw["mode"],
        owned_file_name=kw["owned_file_name"],
        ready_file=_ready_file(kw["ready_file"], kw["run_dir"]),
    )
    try:
        outcome = Installer(options).uninstall()
    except OSError as exc:
        raise click.ClickException(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")) from None
    log.info(
        "uninstalled: wrote=%s removed=%s binary=%s", ",".join(outcome.wrote) or "-",
        ",".join(outcome.removed) or "-", "removed" if outcome.binary_changed else "absent",
    )
