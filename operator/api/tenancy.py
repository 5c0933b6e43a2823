"""What a namespace's runs may use: the admin's tenancy policy, checked at admission (the chart's
ValidatingAdmissionPolicy evaluates the same ConfigMap) and again by the operator before it reads
a run's progress, deletes its files or creates anything for it, so a team cannot point an LLMRun
or an LLMSweep at another team's storage, images, priority classes or training runtimes.

    policy = Policy.load("/etc/nanorun/policy")   # the ConfigMap, one file per key
    policy.refusals("team-a", spec)                # [] or ["spec.storage.uri: ... is outside ..."]

The ConfigMap's keys, each value one entry per line (`{namespace}` stands for the namespace):

- `prefixes`: URI prefixes where every namespace may keep runs (read and write), e.g.
  `s3://runs/{namespace}`;
- `namespace.<name>`: more such prefixes for one namespace;
- `readOnlyPrefixes`: what any namespace may read but not write: shared datasets and tokenizers
  (`data.pretrain`, `tokenizer.from`);
- `images`: prefixes the trainer and serving images must start with (`ghcr.io/nanorun/`);
- `priorityClasses`: the PriorityClasses `compute.priorityClassName` may name;
- `trainingRuntimes`: the ClusterTrainingRuntimes `compute.trainingRuntime` may name;
- `nodeLabels`: the node labels `compute.nodeSelector`, `serving.nodeSelector` and the node
  affinity of `compute.affinity` may name: `key` allows any value, `key=value` that value
  (`nanorun.io/pool={namespace}`);
- `tolerations`: the taints `compute.tolerations` and `serving.tolerations` may tolerate, the same
  way (a toleration without a key tolerates every taint and is never allowed by a list).

A URI is under a prefix when it is the prefix or continues it after a `/` (`s3://runs/team-a` does
not cover `s3://runs/team-ab`). An empty key allows everything of its kind; an empty policy is a
cluster of one team.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NAMESPACE_KEY = "namespace."
PLACEHOLDER = "{namespace}"


def _entries(text: str) -> tuple[str, ...]:
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def _prefixes(text: str) -> tuple[str, ...]:
    return tuple(p.rstrip("/") for p in _entries(text))


def under(uri: str, prefix: str) -> bool:
    """Whether `uri` is `prefix` or below it."""
    return uri.rstrip("/") == prefix or uri.startswith(prefix + "/")


def _listed(allowed: tuple[str, ...]) -> str:
    return ", ".join(allowed) or "none"


@dataclass(frozen=True)
class Policy:
    prefixes: tuple[str, ...] = ()
    namespaces: dict[str, tuple[str, ...]] = field(default_factory=dict)
    read_only: tuple[str, ...] = ()
    images: tuple[str, ...] = ()
    priority_classes: tuple[str, ...] = ()
    training_runtimes: tuple[str, ...] = ()
    node_labels: tuple[str, ...] = ()
    tolerations: tuple[str, ...] = ()

    @classmethod
    def from_data(cls, data: dict[str, str]) -> Policy:
        """From a ConfigMap's data."""
        return cls(
            prefixes=_prefixes(data.get("prefixes", "")),
            namespaces={
                key[len(NAMESPACE_KEY) :]: _prefixes(value)
                for key, value in data.items()
                if key.startswith(NAMESPACE_KEY)
            },
            read_only=_prefixes(data.get("readOnlyPrefixes", "")),
            images=_entries(data.get("images", "")),
            priority_classes=_entries(data.get("priorityClasses", "")),
            training_runtimes=_entries(data.get("trainingRuntimes", "")),
            node_labels=_entries(data.get("nodeLabels", "")),
            tolerations=_entries(data.get("tolerations", "")),
        )

    @classmethod
    def load(cls, folder: str | Path | None) -> Policy:
        """From a ConfigMap mounted as a folder (one file per key; the kubelet's `..data` links and
        hidden entries skipped); None or a missing folder: the empty policy."""
        if not folder or not Path(folder).is_dir():
            return cls()
        files = [p for p in Path(folder).iterdir() if not p.name.startswith(".") and p.is_file()]
        return cls.from_data({p.name: p.read_text() for p in files})

    @property
    def restricts_storage(self) -> bool:
        return bool(self.prefixes or self.namespaces or self.read_only)

    def writable(self, namespace: str) -> tuple[str, ...]:
        own = (p.replace(PLACEHOLDER, namespace) for p in self.prefixes)
        return (*own, *self.namespaces.get(namespace, ()))

    def readable(self, namespace: str) -> tuple[str, ...]:
        return (*self.writable(namespace), *(p.replace(PLACEHOLDER, namespace) for p in self.read_only))

    def may_write(self, namespace: str, uri: str) -> bool:
        return not self.restricts_storage or any(under(uri, p) for p in self.writable(namespace))

    def refusals(self, namespace: str, spec: Any) -> list[str]:
        """What of an LLMRun spec (or an LLMSweep's template) the namespace may not use, one line
        per field, each starting with the field it names."""
        out = []
        if self.restricts_storage:
            writable, readable = self.writable(namespace), self.readable(namespace)
            checks = [("spec.storage.uri", spec.storage.uri, writable, "storage prefixes")]
            # What a stage reads from storage (bundled data and hf:// datasets are no team's storage).
            for where, uri in (
                ("spec.tokenizer.from", spec.tokenizer.from_run),
                ("spec.data.pretrain", spec.data.pretrain),
            ):
                if uri.startswith("s3://"):
                    checks.append((where, uri, readable, "readable prefixes"))
            for where, uri, allowed, what in checks:
                if not any(under(uri, p) for p in allowed):
                    out.append(
                        f"{where}: {uri} is outside the {what} of namespace {namespace} ({_listed(allowed)})"
                    )
        if self.images:
            for where, image in (("spec.image", spec.image), ("spec.serving.image", spec.serving.image)):
                if not any(image.startswith(p) for p in self.images):
                    out.append(f"{where}: {image} is not an allowed image (allowed: {_listed(self.images)})")
        c = spec.compute
        if (
            self.priority_classes
            and c.priority_class_name
            and c.priority_class_name not in self.priority_classes
        ):
            out.append(
                f"spec.compute.priorityClassName: {c.priority_class_name} is not an allowed PriorityClass "
                f"(allowed: {_listed(self.priority_classes)})"
            )
        if self.training_runtimes and c.training_runtime not in self.training_runtimes:
            out.append(
                f"spec.compute.trainingRuntime: {c.training_runtime} is not an allowed training runtime "
                f"(allowed: {_listed(self.training_runtimes)})"
            )
        out += self._placement_refusals(namespace, spec)
        return out

    def _placement_refusals(self, namespace: str, spec: Any) -> list[str]:
        """Node placement outside the admin's lists: the first label or toleration of each field
        that the namespace may not use."""
        out = []
        if self.node_labels:
            labels = tuple(e.replace(PLACEHOLDER, namespace) for e in self.node_labels)
            listed = _listed(labels)
            for where, selector in (
                ("spec.compute.nodeSelector", spec.compute.node_selector),
                ("spec.serving.nodeSelector", spec.serving.node_selector),
            ):
                bad = [
                    f"{k}={v}"
                    for k, v in sorted(selector.items())
                    if k not in labels and f"{k}={v}" not in labels
                ]
                if bad:
                    out.append(f"{where}: {bad[0]} is not an allowed node label (allowed: {listed})")
            bad = [
                e
                for e in _node_affinity_expressions(spec.compute.affinity)
                if not _expression_allowed(e, labels)
            ]
            if bad:
                out.append(
                    f"spec.compute.affinity: {bad[0].get('key', '')} is not an allowed node label (allowed: {listed})"
                )
        if self.tolerations:
            allowed = tuple(e.replace(PLACEHOLDER, namespace) for e in self.tolerations)
            for where, tolerations in (
                ("spec.compute.tolerations", spec.compute.tolerations),
                ("spec.serving.tolerations", spec.serving.tolerations),
            ):
                bad = [_toleration(t) for t in tolerations if not _toleration_allowed(t, allowed)]
                if bad:
                    out.append(
                        f"{where}: {bad[0]} is not an allowed toleration (allowed: {_listed(allowed)})"
                    )
        return out


def _node_affinity_expressions(affinity: dict[str, Any]) -> list[dict[str, Any]]:
    """Every node selector requirement of an affinity's nodeAffinity, required and preferred."""
    node = affinity.get("nodeAffinity") or {}
    terms = list(
        (node.get("requiredDuringSchedulingIgnoredDuringExecution") or {}).get("nodeSelectorTerms") or []
    )
    terms += [
        p.get("preference") or {} for p in node.get("preferredDuringSchedulingIgnoredDuringExecution") or []
    ]
    return [e for t in terms for e in [*(t.get("matchExpressions") or []), *(t.get("matchFields") or [])]]


def _expression_allowed(expression: dict[str, Any], labels: tuple[str, ...]) -> bool:
    """A requirement on a label any value of which is allowed, or `In` values that all are."""
    key = expression.get("key", "")
    values = expression.get("values") or []
    return key in labels or (
        expression.get("operator") == "In" and bool(values) and all(f"{key}={v}" in labels for v in values)
    )


def _toleration(t: dict[str, Any]) -> str:
    """How a toleration is named in a refusal: its key, with `=value` unless it is `Exists`."""
    if not t.get("key"):
        return "(every taint)"
    return t["key"] if t.get("operator") == "Exists" else f"{t['key']}={t.get('value', '')}"


def _toleration_allowed(t: dict[str, Any], allowed: tuple[str, ...]) -> bool:
    key = t.get("key") or ""
    return bool(key) and (
        key in allowed or (t.get("operator") != "Exists" and f"{key}={t.get('value', '')}" in allowed)
    )


OPEN = Policy()  # everything allowed
POLICY_ENV = "NANORUN_POLICY"  # the folder the chart mounts the ConfigMap at


class PolicySource:
    """The policy in a mounted ConfigMap folder, read again at most every `every` seconds: the
    kubelet brings an edited ConfigMap into the folder within a minute, and the operator follows
    without a restart."""

    def __init__(self, folder: str | None = None, every: float = 10.0) -> None:
        self.folder = folder if folder is not None else os.environ.get(POLICY_ENV)
        self.every = every
        self._lock = threading.Lock()
        self._policy, self._read_at = OPEN, float("-inf")

    def current(self) -> Policy:
        with self._lock:
            if time.monotonic() - self._read_at >= self.every:
                self._policy, self._read_at = Policy.load(self.folder), time.monotonic()
            return self._policy
