"""The plugin's configuration: the single source of truth for what stdin may hold.

These pydantic models are used at build time only: ``cni_plugin.schema_gen`` turns them into a plain
pydantic-core schema (``cni_plugin/_generated_schema.py``) that the frozen plugin validates against
without importing pydantic's model layer. ``tests/test_config_schema.py`` checks both agree.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cni_plugin import defaults

LogLevel = Literal["debug", "info", "warning", "error"]


class PortMapping(BaseModel):
    """One ``runtimeConfig.portMappings`` entry; keys are matched case-insensitively (lower-cased first)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    hostport: int = Field(ge=0, le=65535)
    containerport: int = Field(ge=0, le=65535)
    protocol: str = "tcp"
    hostip: str = ""


class RuntimeConfig(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    portmappings: list[PortMapping] = Field(default_factory=list)


class Attachment(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    containerID: str = Field(min_length=1)
    ifname: str = Field(min_length=1)


class PluginConfig(BaseModel):
    """Keys of the ``ambient-cni`` entry in a conflist. Unknown keys are tolerated."""

    model_config = ConfigDict(extra="ignore", strict=True)

    run_dir: str = Field(
        defaults.RUN_DIR, min_length=1, description="Agent run dir: cni.sock, the enrollment snapshot, plugin.log"
    )
    exclude_namespaces: list[str] = Field(
        default_factory=lambda: list(defaults.EXCLUDE_NAMESPACES),
        description="Namespaces never enrolled, until the node agent publishes its own exemptions (which then decide)",
    )
    agent_pod_namespace: str = Field(defaults.AGENT_POD_NAMESPACE, description="Namespace of the node agent's own pods")
    agent_pod_name_prefix: str = Field(
        defaults.AGENT_POD_NAME_PREFIX, description="Name prefix of the node agent's own pods (always admitted)"
    )
    deadline_ms: int = Field(
        defaults.DEADLINE_MS, ge=100, le=120_000, description="End-to-end bound of one agent round trip"
    )
    log_level: LogLevel = Field("info", description="debug, info, warning or error")
    log_file: str | None = Field(
        None, description='Plugin log file; default <run_dir>/plugin.log; "" disables the file'
    )


class NetConf(PluginConfig):
    """The whole stdin object libcni gives a chained plugin."""

    cniVersion: str = Field(min_length=1)
    name: str = Field(min_length=1)
    type: str = Field(min_length=1)
    prevResult: dict[str, Any] | None = None
    runtimeConfig: RuntimeConfig | None = None
    valid_attachments: list[Attachment] | None = Field(None, alias="cni.dev/valid-attachments")
