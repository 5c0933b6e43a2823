"""The LLMSweep CustomResourceDefinition, generated from the pydantic models in `sweep.py` the way
crd.py generates the LLMRun's (`python -m tools.generate --write` writes its copies).

The template is the LLMRun's spec schema, with the LLMRun's rules attached under `spec.template`;
the sweep's own rules sit on `spec`.
"""

from __future__ import annotations

from typing import Any

import yaml
from nanorun.operator import api, sweep
from nanorun.operator.crd import _at, custom_resource_definition, model_schema

CRD_NAME = f"{sweep.PLURAL}.{api.GROUP}"


def openapi_schema() -> dict[str, Any]:
    status = model_schema(sweep.LLMSweepStatus)
    status["x-kubernetes-preserve-unknown-fields"] = True
    status.pop("default", None)
    schema: dict[str, Any] = {
        "type": "object",
        "description": "LLMSweep pretrains a ladder of model depths, or every depth at several FLOP budgets, "
        "as child LLMRuns in parallel, and fits scaling laws to their validation bits per byte.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "APIVersion of this object."},
            "kind": {"type": "string", "description": "Kind of this object."},
            "metadata": {"type": "object"},
            "spec": model_schema(sweep.LLMSweepSpec),
            "status": status,
        },
    }
    for rule in sweep.SWEEP_RULES:
        entry = {"rule": rule.cel, "message": rule.message}
        if rule.field:
            entry["fieldPath"] = rule.field
        _at(schema, rule.path).setdefault("x-kubernetes-validations", []).append(entry)
    return schema


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
        kind=sweep.KIND,
        plural=sweep.PLURAL,
        singular=sweep.SINGULAR,
        short_names=tuple(sweep.SHORT_NAMES),
        schema=openapi_schema(),
        columns=PRINTER_COLUMNS,
    )


def crd_yaml() -> str:
    return yaml.safe_dump(crd(), sort_keys=False, width=1000, allow_unicode=True)
