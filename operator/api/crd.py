"""The LLMRun CustomResourceDefinition, generated from the pydantic models in `llmrun.py`.

    nanorun crd              print the CRD (YAML)
    nanorun crd --sweep      print the LLMSweep CRD (operator/sweep/crd.py)

(`python -m tools.generate --write` writes its committed copies, with the RBAC files and
docs/configuration.md.)

The pydantic JSON schema becomes a Kubernetes structural schema: references inlined, optional
fields without null branches, `default: {}` on sections so their fields' defaults apply, free-form
objects marked `x-kubernetes-preserve-unknown-fields`, and the cross-field `Rule`s attached as CEL
`x-kubernetes-validations`. `.status` keeps unknown fields because kopf stores its state there.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Iterable
from typing import Any

import yaml
from nanorun.operator.api import llmrun, status
from nanorun.operator.api.rules import RULES

CRD_NAME = f"{llmrun.PLURAL}.{llmrun.GROUP}"

_DROP = {"title", "additionalProperties", "$defs"}


def _structural(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """One pydantic JSON-schema node → one structural OpenAPI v3 node."""
    node = dict(node)
    description = node.get("description")
    if "$ref" in node:
        target = defs[node.pop("$ref").split("/")[-1]]
        node = {**target, **node}
    if "anyOf" in node:  # `X | None` → X: absent means unset
        branches = [b for b in node.pop("anyOf") if b.get("type") != "null"]
        assert len(branches) == 1, f"unsupported union: {branches}"
        inner = _structural(branches[0], defs)
        if node.get("default") is not None:
            inner["default"] = node["default"]
        if description:
            inner["description"] = description
        return inner
    if node.get("default", 0) is None:
        node.pop("default")
    out: dict[str, Any] = {}
    extra = node.get("additionalProperties")
    for key, value in node.items():
        if key in _DROP:
            continue
        if key == "properties":
            out["properties"] = {k: _structural(v, defs) for k, v in value.items()}
        elif key == "items":
            out["items"] = _structural(value, defs)
        elif key == "exclusiveMinimum":  # JSON Schema 2020 → OpenAPI v3.0 form
            out["minimum"], out["exclusiveMinimum"] = value, True
        elif key == "exclusiveMaximum":
            out["maximum"], out["exclusiveMaximum"] = value, True
        else:
            out[key] = value
    if description:
        out["description"] = description
    if node.get("type") == "object" and "properties" not in node:
        if isinstance(extra, dict) and extra:
            out["additionalProperties"] = _structural(extra, defs)
        else:
            out["x-kubernetes-preserve-unknown-fields"] = True
    if "properties" in out:  # sections default to {} so their fields' defaults apply
        required = set(out.get("required", []))
        for name, prop in out["properties"].items():
            if "properties" in prop and name not in required and "default" not in prop:
                prop["default"] = {}
    return out


def model_schema(model: type[llmrun.Model]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True)
    return _structural(raw, raw.get("$defs", {}))


def _at(schema: dict[str, Any], path: str) -> dict[str, Any]:
    node = schema
    for part in filter(None, path.split(".")):
        node = node["properties"][part]
    return node


def resource_schema(description: str, spec: type, status: type, rules: Iterable[Any]) -> dict[str, Any]:
    """The openAPIV3Schema of a custom resource: `spec` and `status` from their models (the status
    keeps fields it does not know, for a newer operator's), and each rule attached as a CEL
    validation at its path."""
    status_schema = model_schema(status)
    status_schema["x-kubernetes-preserve-unknown-fields"] = True
    status_schema.pop("default", None)
    schema: dict[str, Any] = {
        "type": "object",
        "description": description,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "APIVersion of this object."},
            "kind": {"type": "string", "description": "Kind of this object."},
            "metadata": {"type": "object"},
            "spec": model_schema(spec),
            "status": status_schema,
        },
    }
    for rule in rules:
        entry = {"rule": rule.cel, "message": rule.message}
        if rule.field:  # the field the API server names when the rule fails
            entry["fieldPath"] = rule.field
        _at(schema, rule.path).setdefault("x-kubernetes-validations", []).append(entry)
    return schema


def openapi_schema() -> dict[str, Any]:
    """The LLMRun CRD's openAPIV3Schema."""
    return resource_schema(
        "LLMRun trains a chat model from scratch (tokenizer, pretraining, post-training, evaluation) as "
        "one Kubeflow job per stage (a PyTorchJob or a Trainer v2 TrainJob), then serves it with a "
        "KubeRay RayService.",
        llmrun.LLMRunSpec,
        status.LLMRunStatus,
        RULES,
    )


PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Phase of the run."},
    {"name": "Stage", "type": "string", "jsonPath": ".status.stage", "description": "Current stage."},
    {
        "name": "Progress",
        "type": "string",
        "jsonPath": ".status.progress",
        "description": "step/total of the current stage.",
    },
    {"name": "Loss", "type": "number", "jsonPath": ".status.loss", "description": "Latest training loss."},
    {
        "name": "ETA",
        "type": "string",
        "jsonPath": ".status.eta",
        "description": "Estimated time left in the current stage.",
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def custom_resource_definition(
    *, kind: str, plural: str, singular: str, short_names: tuple[str, ...], schema: dict, columns: list
) -> dict[str, Any]:
    """A namespaced CustomResourceDefinition of nanorun's group, one version with a status
    subresource: the frame the LLMRun and LLMSweep CRDs share."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{llmrun.GROUP}", "labels": {"app.kubernetes.io/part-of": "nanorun"}},
        "spec": {
            "group": llmrun.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": singular,
                "shortNames": list(short_names),
                "categories": ["nanorun"],
            },
            "versions": [
                {
                    "name": llmrun.VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": schema},
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": copy.deepcopy(columns),
                }
            ],
        },
    }


def crd() -> dict[str, Any]:
    """The CustomResourceDefinition object."""
    return custom_resource_definition(
        kind=llmrun.KIND,
        plural=llmrun.PLURAL,
        singular=llmrun.SINGULAR,
        short_names=tuple(llmrun.SHORT_NAMES),
        schema=openapi_schema(),
        columns=PRINTER_COLUMNS,
    )


def crd_yaml() -> str:
    return yaml.safe_dump(crd(), sort_keys=False, width=1000, allow_unicode=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="nanorun crd", description="Print the LLMRun CustomResourceDefinition (YAML)."
    )
    parser.add_argument("--sweep", action="store_true", help="print the LLMSweep CRD instead")
    if parser.parse_args(argv).sweep:
        from nanorun.operator.sweep.crd import crd_yaml as sweep_crd_yaml  # it imports this module

        sys.stdout.write(sweep_crd_yaml())
        return 0
    sys.stdout.write(crd_yaml())
    return 0


if __name__ == "__main__":
    sys.exit(main())
