"""Prometheus metrics of the agent (one registry per agent instance)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "ambient_cni_agent_requests",
            "Plugin requests handled, by op and result (ok, not_enrolled, error, refused)",
            ["op", "result"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "ambient_cni_agent_request_seconds",
            "Time from a complete request to the reply, by op",
            ["op"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.enrolled = Gauge(
            "ambient_cni_agent_enrolled_pods", "Pods with an enrollment record", registry=self.registry
        )
        self.reconcile = Counter(
            "ambient_cni_agent_reconcile_actions",
            "Reconcile actions taken (enroll, remove, reenroll, restore, failed)",
            ["action"],
            registry=self.registry,
        )
        self.reconcile_passes = Counter(
            "ambient_cni_agent_reconcile_passes", "Reconcile passes completed", registry=self.registry
        )
        self.reconcile_pass_seconds = Histogram(
            "ambient_cni_agent_reconcile_pass_seconds",
            "Wall time of one reconcile pass (every record checked, drift verified and repaired)",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.drift_repairs = Counter(
            "ambient_cni_agent_drift_repairs",
            "Pods whose redirection had drifted and was rewritten under guardrails, by phase (restore: taking over "
            "a pod from a previous run; periodic: a reconcile pass)",
            ["phase"],
            registry=self.registry,
        )
        self.drift_repair_failures = Counter(
            "ambient_cni_agent_drift_repair_failures",
            "Drift repairs that failed (the pod's guardrails stay until a later pass succeeds)",
            registry=self.registry,
        )
        self.variant_changes = Counter(
            "ambient_cni_agent_variant_changes",
            "Pods whose rules were rewritten (under guardrails) for another redirection variant because their "
            "annotations or the agent's defaults changed, by phase (restore: taking over a pod from a previous run; "
            "periodic: a reconcile pass)",
            ["phase"],
            registry=self.registry,
        )
        self.kept_rules = Counter(
            "ambient_cni_agent_kept_rules",
            "In-pod rules kept by a CNI DEL, by event: kept (at the DEL), readded (a re-ADD of the same netns "
            "enrolled it again), removed (no re-ADD within the grace, or the pod is no longer enrolled), gone (the "
            "netns was gone or replaced: nothing done inside it), failed (removal failed; retried)",
            ["event"],
            registry=self.registry,
        )
        self.state_db_corruptions = Counter(
            "ambient_cni_agent_state_db_corruptions",
            "State databases found corrupt and moved aside (records then rebuilt from the view and netns discovery)",
            registry=self.registry,
        )
        self.snapshot_writes = Counter(
            "ambient_cni_agent_snapshot_writes", "Enrollment snapshots written", registry=self.registry
        )
        self.annotation_patches = Counter(
            "ambient_cni_agent_annotation_patches",
            "Pod annotation patches (ambient.istio.io/redirection) by result (ok, failed: retried, gone)",
            ["result"],
            registry=self.registry,
        )
        self.plugin_log_lines = Counter(
            "ambient_cni_agent_plugin_log_lines", "Plugin log lines re-emitted", registry=self.registry
        )
