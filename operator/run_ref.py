"""The LLMRun a child belongs to: its name, namespace and uid, and the owner reference that makes
the cluster delete the child with the run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nanorun.operator.api import API_VERSION, KIND


@dataclass(frozen=True)
class RunRef:
    """What a child needs to know about its LLMRun."""

    name: str
    namespace: str
    uid: str

    def owner_reference(self) -> dict[str, Any]:
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
