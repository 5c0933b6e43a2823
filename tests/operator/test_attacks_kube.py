"""Team B against team A's finished run on the test cluster, one test per way to reach it: every
attempt is refused at admission with a message naming the field (the CRD's rules or the chart's
tenancy policy, each with the message `nanorun run` and the operator give), and team A's storage is
byte-identical afterwards: the module's fixture checksums every object under A's prefix before the
first attempt and after the last.

What gets past admission is the operator's to refuse: an LLMRun admitted before the policy
changed is neither read into B's status nor cleaned up by B's deletion
(tests/operator/test_tenancy_kube.py); NetworkPolicies keep B's pods off A's Ray ports and chat
(tests/kube/test_controllers.py)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from nanorun.operator.api import SpecError, parse_spec
from nanorun.operator.api.tenancy import Policy
from nanorun.pipeline import storage

from tests.fixtures.kube import KubeEnv, deploy_s3, wait_until
from tests.operator.test_tenancy_kube import PREFIX, apply_policy, checksums, finished_run, server_refusal

pytestmark = [pytest.mark.kube]


@dataclass(frozen=True)
class Arena:
    team_a: str
    team_b: str
    theirs: str  # team A's finished run
    own: str  # a prefix team B may use
    policy: Policy


@pytest.fixture(scope="module")
def arena(kube: KubeEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Arena]:
    """Team A's finished run in S3, and the chart's tenancy policy (ConfigMap,
    ValidatingAdmissionPolicy, binding) for teams A and B with every list set. Afterwards every
    object under team A's prefix is byte for byte what it was."""
    if kube.pods_unsupported:
        pytest.skip(f"pods cannot run here: {kube.pods_unsupported}")
    suffix = uuid.uuid4().hex[:6]
    team_a, team_b = f"attack-a-{suffix}", f"attack-b-{suffix}"
    for ns in (team_a, team_b):
        kube.kubectl("create", "namespace", ns)
    objects = apply_policy(
        kube,
        tmp_path_factory.mktemp("attacks"),
        f"at-{suffix}",
        [team_a, team_b],
        {
            "storage": {"prefixes": [PREFIX], "readOnlyPrefixes": ["s3://nanorun/shared"]},
            "images": ["ghcr.io/nanorun/"],
            "priorityClasses": ["training-low"],
            "trainingRuntimes": ["nanorun-torch"],
            "nodeLabels": ["nanorun.io/pool={namespace}", "nvidia.com/gpu.product"],
            "tolerations": ["nvidia.com/gpu", "nanorun.io/pool={namespace}"],
        },
    )
    with pytest.MonkeyPatch.context() as env:
        ip = _s3(kube, team_a)
        for key, value in {
            "AWS_ENDPOINT_URL": f"http://{ip}:9000",
            "AWS_ENDPOINT_URL_S3": f"http://{ip}:9000",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            env.setenv(key, value)
        theirs = PREFIX.format(namespace=team_a) + "/finished"
        finished_run(theirs)
        before = checksums(PREFIX.format(namespace=team_a))
        policy = Policy.from_data(next(o for o in objects if o["kind"] == "ConfigMap")["data"])
        try:
            yield Arena(team_a, team_b, theirs, PREFIX.format(namespace=team_b) + "/r1", policy)
            after = checksums(PREFIX.format(namespace=team_a))
            assert len(before) == 2 and after == before, (before, after)  # progress and checkpoint
        finally:
            for o in objects:
                if o["kind"] != "ConfigMap":
                    kube.kubectl(
                        "delete", o["kind"].lower(), o["metadata"]["name"], "--wait=false", check=False
                    )
            for ns in (team_a, team_b):
                kube.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def _s3(kube: KubeEnv, namespace: str) -> str:
    deploy_s3(kube, namespace)
    return kube.kubectl("get", "service", "s3", "-n", namespace, "-o", "jsonpath={.spec.clusterIP}").stdout


def run(storage_: dict, **more) -> dict:
    return {"storage": storage_, **more}


# (id, kind, spec from (team A's run, team B's own prefix, team A's namespace), the field refused)
ATTACKS = [
    ("a-prefix", "LLMRun", lambda a, own, ns: run({"uri": a}), "spec.storage.uri"),
    ("bare-bucket", "LLMRun", lambda a, own, ns: run({"uri": "s3://nanorun"}), "spec.storage.uri"),
    ("dotdot", "LLMRun", lambda a, own, ns: run({"uri": f"{own}/../../{ns}/finished"}), "spec.storage.uri"),
    (
        "delete-with-cleanup",
        "LLMRun",
        lambda a, own, ns: run({"uri": a, "cleanupOnDelete": True}),
        "spec.storage.uri",
    ),
    (
        "extra-args-run-dir",
        "LLMRun",
        lambda a, own, ns: run({"uri": own}, stages={"pretrain": {"extraArgs": ["--run-dir", a]}}),
        "spec.stages.pretrain.extraArgs",
    ),
    (
        "read-a-tokenizer",
        "LLMRun",
        lambda a, own, ns: run({"uri": own}, tokenizer={"from": a}),
        "spec.tokenizer.from",
    ),
    (
        "read-a-data",
        "LLMRun",
        lambda a, own, ns: run({"uri": own}, data={"pretrain": f"{a}/data"}),
        "spec.data.pretrain",
    ),
    (
        "image",
        "LLMRun",
        lambda a, own, ns: run({"uri": own}, image="docker.io/someone/trainer:1"),
        "spec.image",
    ),
    (
        "priority-class",
        "LLMRun",
        lambda a, own, ns: run({"uri": own}, compute={"priorityClassName": "system-cluster-critical"}),
        "spec.compute.priorityClassName",
    ),
    (
        "training-runtime",
        "LLMRun",
        lambda a, own, ns: run({"uri": own}, compute={"trainingRuntime": "team-a-runtime"}),
        "spec.compute.trainingRuntime",
    ),
    (
        "a-nodes",
        "LLMRun",
        lambda a, own, ns: run({"uri": own}, compute={"nodeSelector": {"nanorun.io/pool": ns}}),
        "spec.compute.nodeSelector",
    ),
    (
        "every-taint",
        "LLMRun",
        lambda a, own, ns: run({"uri": own}, compute={"tolerations": [{"operator": "Exists"}]}),
        "spec.compute.tolerations",
    ),
    (
        "a-nodes-by-affinity",
        "LLMRun",
        lambda a, own, ns: run(
            {"uri": own},
            compute={
                "affinity": {
                    "nodeAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": {
                            "nodeSelectorTerms": [
                                {
                                    "matchExpressions": [
                                        {"key": "nanorun.io/pool", "operator": "In", "values": [ns]}
                                    ]
                                }
                            ]
                        }
                    }
                }
            },
        ),
        "spec.compute.affinity",
    ),
    (
        "a-taint-for-serving",
        "LLMRun",
        lambda a, own, ns: run(
            {"uri": own},
            serving={"enabled": False, "tolerations": [{"key": "nanorun.io/pool", "value": ns}]},
        ),
        "spec.serving.tolerations",
    ),
    (
        "sweep-at-a",
        "LLMSweep",
        lambda a, own, ns: {
            "template": run({"uri": a}, serving={"enabled": False}),
            "depths": [2],
            "flopBudgets": [1e9],
        },
        "spec.template.storage.uri",
    ),
]


def expected_refusal(arena: Arena, kind: str, spec: dict) -> str:
    """The first line `nanorun run` (the CRD's rules) or the operator (the tenancy policy) gives."""
    template = spec["template"] if kind == "LLMSweep" else spec
    try:
        parsed = parse_spec({"serving": {"enabled": False}, **template})
    except SpecError as err:
        return str(err).splitlines()[0]
    lines = arena.policy.refusals(arena.team_b, parsed)
    assert lines, "the attack is allowed"
    return lines[0].replace("spec.", "spec.template.", 1) if kind == "LLMSweep" else lines[0]


@pytest.mark.parametrize("kind, attack, field", [pytest.param(*a[1:], id=a[0]) for a in ATTACKS])
def test_team_b_is_refused_naming_the_field(kube, arena, kind, attack, field):
    spec = attack(arena.theirs, arena.own, arena.team_a)
    expected = expected_refusal(arena, kind, spec)
    assert expected.startswith(field + ":"), expected
    # The binding takes effect once the API server has seen it.
    message = wait_until(lambda: server_refusal(kube, arena.team_b, kind, spec), bool, timeout=30)
    # The policy's message as it is; a CRD rule's with the value between (`field: Invalid value: ...`).
    where, what = expected.split(": ", 1)
    assert expected in message or (f"{where}: Invalid value" in message and what in message), message
    # Team A's own run with the same placement is admitted where the lists allow A.
    if field in ("spec.compute.nodeSelector", "spec.compute.affinity", "spec.serving.tolerations"):
        mine = {**spec, "storage": {"uri": arena.theirs.rsplit("/", 1)[0] + "/again"}}
        assert server_refusal(kube, arena.team_a, kind, mine) == ""


def test_team_bs_own_run_is_admitted(kube, arena):
    """The control: what team B may use passes the same admission."""
    ok = run(
        {"uri": arena.own},
        image="ghcr.io/nanorun/nanorun-trainer:1",
        data={"pretrain": "s3://nanorun/shared/fineweb"},
        compute={
            "priorityClassName": "training-low",
            "nodeSelector": {"nanorun.io/pool": arena.team_b, "nvidia.com/gpu.product": "H100"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
        },
        serving={"enabled": False, "image": "ghcr.io/nanorun/nanorun-serving:1"},
    )
    assert arena.policy.refusals(arena.team_b, parse_spec(ok)) == []
    assert (
        wait_until(lambda: server_refusal(kube, arena.team_b, "LLMRun", ok), lambda m: m == "", timeout=30)
        == ""
    )
    assert storage.list_files(arena.own) == []  # admission wrote nothing
