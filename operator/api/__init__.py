"""The LLMRun API (nanorun.io/v1alpha1): the pydantic models of its spec (`llmrun.py`) and status
(`status.py`),
the cross-field rules that are both CEL for admission and Python for `nanorun run` (`rules.py`),
the CustomResourceDefinition generated from them (`crd.py`), and the admin's tenancy policy that
says what a namespace's runs may use (`tenancy.py`). The names the rest of nanorun imports from
the models are importable from this package: `from nanorun.operator.api import LLMRunSpec`.
"""

from nanorun.operator.api.llmrun import (
    API_VERSION,
    DEFAULT_IMAGE,
    DEFAULT_RAY_VERSION,
    GROUP,
    KIND,
    PLURAL,
    SHORT_NAMES,
    VERSION,
    LLMRunSpec,
    Model,
    Phase,
    SpecError,
    StagesSpec,
    check_update,
    parse_spec,
    spec_to_dict,
)
from nanorun.operator.api.status import Condition, LLMRunStatus, StageMetrics, StageStatus

__all__ = [
    "API_VERSION",
    "DEFAULT_IMAGE",
    "DEFAULT_RAY_VERSION",
    "GROUP",
    "KIND",
    "PLURAL",
    "SHORT_NAMES",
    "VERSION",
    "Condition",
    "LLMRunSpec",
    "LLMRunStatus",
    "Model",
    "Phase",
    "SpecError",
    "StageMetrics",
    "StagesSpec",
    "StageStatus",
    "check_update",
    "parse_spec",
    "spec_to_dict",
]
