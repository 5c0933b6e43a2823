"""The chart's copy of the operator's RBAC rules, generated from `OPERATOR_RBAC_RULES`.

Helm cannot import Python, so the chart reads the rules from `charts/nanorun/files/rbac-rules.yaml`
and the plain manifests carry them in `manifests/rbac/clusterrole.yaml`. Both are generated from
`nanorun.operator.rbac.OPERATOR_RBAC_RULES`; tests/charts/test_rbac.py fails when either is stale.

    python -m tests.charts.rbac_rules --write     regenerate both files
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml
from nanorun.operator.rbac import OPERATOR_RBAC_RULES

REPO = Path(__file__).resolve().parents[2]
CHART_RULES = REPO / "charts/nanorun/files/rbac-rules.yaml"
MANIFEST_ROLE = REPO / "manifests/rbac/clusterrole.yaml"
HEADER = (
    "# Generated from nanorun.operator.rbac.OPERATOR_RBAC_RULES by\n"
    "# `python -m tests.charts.rbac_rules --write`; do not edit (a test fails when it is stale).\n"
)


def chart_rules_text() -> str:
    return HEADER + yaml.safe_dump(OPERATOR_RBAC_RULES, sort_keys=False, default_flow_style=None)


def manifest_role_text() -> str:
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": "nanorun-operator", "labels": {"app.kubernetes.io/name": "nanorun",
                                                           "app.kubernetes.io/component": "operator"}},
        "rules": OPERATOR_RBAC_RULES,
    }
    return HEADER + yaml.safe_dump(role, sort_keys=False, default_flow_style=None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="write the generated files")
    args = parser.parse_args(argv)
    if not args.write:
        print(chart_rules_text(), end="")
        return 0
    for path, text in ((CHART_RULES, chart_rules_text()), (MANIFEST_ROLE, manifest_role_text())):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
