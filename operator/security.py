"""The security context of every pod nanorun creates: what Pod Security Admission's `restricted`
profile requires (https://kubernetes.io/docs/concepts/security/pod-security-standards/#restricted),
and no ServiceAccount token where no container calls the Kubernetes API.

    restrict(pod_spec)                 # a training or serving pod
    restrict(pod_spec, api_token=True) # the Ray head, whose autoscaler sidecar scales the workers

The images run as numeric non-root users (`USER 10001:10001`, the serving image's `1000:100`), which
`runAsNonRoot` checks without naming a uid, so a team's own image keeps its own user.
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


def restrict(pod: dict[str, Any], api_token: bool = False) -> dict[str, Any]:
    """`pod` (a pod spec, changed in place and returned) under the `restricted` profile: the pod's
    and each container's security context, and the ServiceAccount token mounted only with
    `api_token`."""
    pod["securityContext"] = {**copy.deepcopy(POD_SECURITY_CONTEXT), **pod.get("securityContext", {})}
    for container in [*pod.get("initContainers", []), *pod.get("containers", [])]:
        container["securityContext"] = {
            **copy.deepcopy(CONTAINER_SECURITY_CONTEXT),
            **container.get("securityContext", {}),
        }
    pod["automountServiceAccountToken"] = api_token
    return pod
