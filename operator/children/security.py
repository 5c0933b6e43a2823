"""The security context of every pod nanorun creates: what Pod Security Admission's `restricted`
profile requires (https://kubernetes.io/docs/concepts/security/pod-security-standards/#restricted),
and no ServiceAccount token where no container calls the Kubernetes API.

    restrict(pod_spec)                 # a training or serving pod
    restrict(pod_spec, api_token=True) # the Ray head, whose autoscaler sidecar scales the workers

The serving image runs as its own numeric non-root user (`1000:100`, Ray's), which `runAsNonRoot`
checks without naming a uid. Training pods name theirs, the trainer image's `10001:10001`
(`TRAINER_USER`): the training-operator adds an init container to PyTorchJob Workers from an image
of its own configuration (alpine by default, whose user is root), which runs as the pod's user.
"""

from __future__ import annotations

import copy
from typing import Any

POD_SECURITY_CONTEXT: dict[str, Any] = {
    "runAsNonRoot": True,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY_CONTEXT: dict[str, Any] = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
}


TRAINER_USER: dict[str, Any] = {"runAsUser": 10001, "runAsGroup": 10001}


def restrict(
    pod: dict[str, Any], api_token: bool = False, user: dict[str, Any] | None = None
) -> dict[str, Any]:
    """`pod` (a pod spec, changed in place and returned) under the `restricted` profile: the pod's
    and each container's security context (with `user`'s uid and gid, when given), and the
    ServiceAccount token mounted only with `api_token`."""
    pod["securityContext"] = {
        **copy.deepcopy(POD_SECURITY_CONTEXT),
        **(user or {}),
        **pod.get("securityContext", {}),
    }
    for container in [*pod.get("initContainers", []), *pod.get("containers", [])]:
        container["securityContext"] = {
            **copy.deepcopy(CONTAINER_SECURITY_CONTEXT),
            **container.get("securityContext", {}),
        }
    pod["automountServiceAccountToken"] = api_token
    return pod
