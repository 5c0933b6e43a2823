"""The LLMSweep CustomResourceDefinition, generated from the pydantic models in `api.py` the way
`operator/api/crd.py` generates the LLMRun's (`python -m tools.generate --write` writes its copies).

The template is the LLMRun's spec schema, with the LLMRun's rules attached under `spec.template`;
the sweep's own rules sit on `spec`.
"""

from __future__ import annotations

from typing import Any

import yaml
from nanorun.operator.api import GROUP
from nanorun.operator.api.crd import custom_resource_definition, resource_schema
from nanorun.operator.sweep.api import (
    KIND,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    SWEEP_RULES,
    LLMSweepSpec,
    LLMSweepStatus,
)

CRD_NAME = f"{PLURAL}.{GROUP}"


def openapi_schema() -> dict[str, Any]:
    """The LLMSweep CRD's openAPIV3Schema."""
    return resource_schema(
        "LLMSweep pretrains a ladder of model depths, or every depth at several FLOP budgets, as child "
        "LLMRuns in parallel, and fits scaling laws to their validation bits per byte.",
        LLMSweepSpec,
        LLMSweepStatus,
        SWEEP_RULES,
    )


PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Phase of the sweep."},
    {"name": "Done", "type": "integer", "jsonPath": ".status.done", "description": "Points succeeded."},
    {"name": "Running", "type": "integer", "jsonPath": ".status.running", "description": "Points running."},
    {"name": "Total", "type": "integer", "jsonPath": ".status.total", "description": "Points in the sweep."},
    {
        "name": "Best",
        "type": "string",
        "jsonPath": ".status.best",
        "description": "Finished point with the lowest validation bpb.",
    },
    {"name": "BPB", "type": "number", "jsonPath": ".status.bestBpb", "description": "Its validation bpb."},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def crd() -> dict[str, Any]:
    return custom_resource_definition(
        kind=KIND,
        plural=PLURAL,
        singular=SINGULAR,
        short_names=tuple(SHORT_NAMES),
        schema=openapi_schema(),
        columns=PRINTER_COLUMNS,
    )


def crd_yaml() -> str:
    return yaml.safe_dump(crd(), sort_keys=False, width=1000, allow_unicode=True)
