"""The tenancy policy (operator/api/tenancy.py): what a namespace's runs may use, as the operator
judges them before it reads or deletes anything. The chart's ConfigMap: tests/charts/test_chart.py;
the same lists at admission: tests/operator/test_tenancy_kube.py."""

from __future__ import annotations

import datetime as dt

import pytest
from nanorun.operator.api import parse_spec
from nanorun.operator.api.tenancy import Policy, PolicySource
from nanorun.operator.reconcile.run import reconcile
from nanorun.operator.run_ref import RunRef
from nanorun.operator.sweep.reconcile import reconcile_sweep

T0 = dt.datetime(2026, 1, 1, 12, tzinfo=dt.timezone.utc)
POLICY = Policy.from_data(
    {
        "prefixes": "s3://runs/{namespace}/\n",
        "namespace.team-a": "s3://a-archive/runs",
        "readOnlyPrefixes": "s3://shared/data\ns3://shared/tokenizers/",
    }
)


def spec(uri: str, **more):
    return parse_spec({"storage": {"uri": uri}, "serving": {"enabled": False}, **more})


@pytest.mark.parametrize(
    "namespace, uri, allowed",
    [
        ("team-a", "s3://runs/team-a/r1", True),
        ("team-a", "s3://runs/team-a", True),  # the prefix itself
        ("team-a", "s3://runs/team-a/", True),
        ("team-a", "s3://runs/team-b/r1", False),  # another team's prefix
        ("team-a", "s3://runs/team-ab/r1", False),  # a longer name is not below the prefix
        ("team-a", "s3://runs/r1", False),
        ("team-a", "s3://a-archive/runs/r1", True),  # team-a's own extra prefix
        ("team-b", "s3://a-archive/runs/r1", False),
        ("team-a", "s3://shared/data/r1", False),  # read-only: no runs there
        ("team-a", "/data/runs/r1", False),  # a pod's local folder is no team's storage
    ],
)
def test_a_run_may_keep_its_files_only_under_its_namespaces_prefixes(namespace, uri, allowed):
    refusals = POLICY.refusals(namespace, spec(uri))
    assert (refusals == []) == allowed, refusals
    if not allowed:
        assert refusals == [
            f"spec.storage.uri: {uri} is outside the storage prefixes of namespace {namespace} "
            f"({', '.join(POLICY.writable(namespace))})"
        ]


def test_a_run_may_read_shared_data_and_tokenizers_but_not_another_teams():
    ok = spec(
        "s3://runs/team-a/r1",
        data={"pretrain": "s3://shared/data/fineweb"},
        tokenizer={"from": "s3://shared/tokenizers/t32k"},
    )
    assert POLICY.refusals("team-a", ok) == []
    assert POLICY.refusals("team-a", spec("s3://runs/team-a/r1", data={"pretrain": "bundled"})) == []
    stolen = spec(
        "s3://runs/team-a/r1",
        data={"pretrain": "s3://runs/team-b/private-data"},
        tokenizer={"from": "s3://runs/team-b/r9"},
    )
    refusals = POLICY.refusals("team-a", stolen)
    assert [r.split(":", 1)[0] for r in refusals] == ["spec.tokenizer.from", "spec.data.pretrain"]
    assert all("is outside the readable prefixes of namespace team-a" in r for r in refusals)


def test_images_priority_classes_and_training_runtimes_come_from_the_admins_lists():
    policy = Policy.from_data(
        {
            "images": "ghcr.io/nanorun/\nregistry.example.com/team-a/",
            "priorityClasses": "training-low",
            "trainingRuntimes": "nanorun-torch",
        }
    )
    assert not policy.restricts_storage  # storage stays open: another list's business
    assert policy.refusals("team-a", spec("s3://any/r")) == []  # the defaults are allowed
    ok = spec(
        "s3://any/r",
        image="registry.example.com/team-a/trainer:1",
        compute={"priorityClassName": "training-low"},
    )
    assert policy.refusals("team-a", ok) == []
    bad = spec(
        "s3://any/r",
        image="registry.example.com/team-ab/trainer:1",
        serving={"enabled": False, "image": "docker.io/evil/serving:1"},
        compute={"priorityClassName": "system-cluster-critical", "trainingRuntime": "other-team"},
    )
    assert policy.refusals("team-a", bad) == [
        "spec.image: registry.example.com/team-ab/trainer:1 is not an allowed image "
        "(allowed: ghcr.io/nanorun/, registry.example.com/team-a/)",
        "spec.serving.image: docker.io/evil/serving:1 is not an allowed image "
        "(allowed: ghcr.io/nanorun/, registry.example.com/team-a/)",
        "spec.compute.priorityClassName: system-cluster-critical is not an allowed PriorityClass "
        "(allowed: training-low)",
        "spec.compute.trainingRuntime: other-team is not an allowed training runtime (allowed: nanorun-torch)",
    ]


def test_an_empty_policy_allows_every_uri():
    assert not Policy().restricts_storage
    assert Policy().refusals("team-a", spec("s3://anything/at/all")) == []
    assert Policy.load(None) == Policy() and Policy.load("/no/such/folder") == Policy()


def test_the_policy_is_read_from_a_mounted_configmap_and_followed_when_it_changes(tmp_path):
    # A ConfigMap volume as the kubelet writes it: the keys are links into a `..data` folder.
    data = tmp_path / "..2026_01_01"
    data.mkdir()
    (data / "prefixes").write_text("s3://runs/{namespace}\n")
    (tmp_path / "..data").symlink_to(data.name)
    (tmp_path / "prefixes").symlink_to("..data/prefixes")
    source = PolicySource(str(tmp_path), every=0.0)
    assert source.current().writable("team-a") == ("s3://runs/team-a",)
    (data / "prefixes").write_text("s3://elsewhere/{namespace}\n")
    assert source.current().writable("team-a") == ("s3://elsewhere/team-a",)
    cached = PolicySource(str(tmp_path), every=3600.0)
    first = cached.current()
    (data / "prefixes").write_text("s3://third/{namespace}\n")
    assert cached.current() is first  # read again only after `every` seconds


def test_the_operator_neither_reads_nor_acts_on_a_run_outside_its_namespaces_storage():
    reads: list[str] = []

    def read_stage(stage: str):
        reads.append(stage)
        return None, None

    body = {
        "metadata": {"name": "r1", "namespace": "team-b", "uid": "u", "generation": 1},
        "spec": {
            "storage": {"uri": "s3://runs/team-a/finished", "cleanupOnDelete": True},
            "serving": {"enabled": False},
        },
    }
    run = RunRef("r1", "team-b", "u")
    d = reconcile(run, body, [], None, read_stage, T0, policy=POLICY)
    assert reads == [] and d.create_jobs == [] and d.create_rayservice is None
    degraded = next(c for c in d.status["conditions"] if c["type"] == "Degraded")
    assert degraded["reason"] == "InvalidSpec"
    assert degraded["message"].startswith(
        "spec.storage.uri: s3://runs/team-a/finished is outside the storage prefixes of namespace team-b"
    )
    # The same run in its own namespace goes ahead (and reads its progress).
    own = reconcile(RunRef("r1", "team-a", "u"), body, [], None, read_stage, T0, policy=POLICY)
    assert own.create_jobs and reads


def test_a_sweep_outside_its_namespaces_storage_creates_no_point():
    body = {
        "metadata": {"name": "s", "generation": 1},
        "spec": {
            "template": {"storage": {"uri": "s3://runs/team-a/sweep"}},
            "depths": [2],
            "flopBudgets": [1e9],
        },
    }
    reads: list[tuple[str, str]] = []
    d = reconcile_sweep(
        RunRef("s", "team-b", "u"), body, [], [], lambda *a: reads.append(a), T0, policy=POLICY
    )
    assert d.create_runs == [] and reads == [] and not d.manifest
    degraded = next(c for c in d.status["conditions"] if c["type"] == "Degraded")
    assert degraded["message"].startswith("spec.template.storage.uri: s3://runs/team-a/sweep is outside")


def test_policy_source_reads_the_environment_folder(monkeypatch, tmp_path):
    (tmp_path / "prefixes").write_text("s3://x/{namespace}")
    monkeypatch.setenv("NANORUN_POLICY", str(tmp_path))
    assert PolicySource().current().writable("n") == ("s3://x/n",)


PLACEMENT = Policy.from_data(
    {
        "nodeLabels": "nanorun.io/pool={namespace}\nnvidia.com/gpu.product",
        "tolerations": "nvidia.com/gpu\npool={namespace}",
    }
)
GPU = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def placed(compute=None, serving=None):
    return spec("s3://any/r", compute=compute or {}, serving={"enabled": False, **(serving or {})})


def required(*expressions):
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": list(expressions)}]
            }
        }
    }


@pytest.mark.parametrize(
    "compute, serving, refusal",
    [
        (
            {
                "nodeSelector": {"nanorun.io/pool": "team-a", "nvidia.com/gpu.product": "H100"},
                "tolerations": [GPU],
            },
            {},
            None,
        ),
        (
            {"nodeSelector": {"nanorun.io/pool": "team-b"}},
            {},
            "spec.compute.nodeSelector: nanorun.io/pool=team-b is not an allowed node label",
        ),
        (
            {},
            {"nodeSelector": {"kubernetes.io/hostname": "n1"}},
            "spec.serving.nodeSelector: kubernetes.io/hostname=n1 is not an allowed node label",
        ),
        (
            {"tolerations": [{"operator": "Exists"}]},
            {},
            "spec.compute.tolerations: (every taint) is not an allowed toleration",
        ),
        ({"tolerations": [{"key": "pool", "value": "team-a", "effect": "NoSchedule"}]}, {}, None),
        (
            {"tolerations": [{"key": "pool", "operator": "Exists"}]},
            {},
            "spec.compute.tolerations: pool is not an allowed toleration",
        ),
        (
            {},
            {"tolerations": [{"key": "pool", "value": "team-b"}]},
            "spec.serving.tolerations: pool=team-b is not an allowed toleration",
        ),
        (
            {"affinity": required({"key": "nanorun.io/pool", "operator": "In", "values": ["team-a"]})},
            {},
            None,
        ),
        (
            {"affinity": required({"key": "nvidia.com/gpu.product", "operator": "NotIn", "values": ["T4"]})},
            {},
            None,
        ),
        (
            {
                "affinity": required(
                    {"key": "nanorun.io/pool", "operator": "In", "values": ["team-a", "team-b"]}
                )
            },
            {},
            "spec.compute.affinity: nanorun.io/pool is not an allowed node label",
        ),
        (
            {"affinity": required({"key": "nanorun.io/pool", "operator": "NotIn", "values": ["team-b"]})},
            {},
            "spec.compute.affinity: nanorun.io/pool is not an allowed node label",
        ),
        (
            {
                "affinity": {
                    "nodeAffinity": {
                        "preferredDuringSchedulingIgnoredDuringExecution": [
                            {
                                "weight": 1,
                                "preference": {
                                    "matchFields": [
                                        {"key": "metadata.name", "operator": "In", "values": ["n1"]}
                                    ]
                                },
                            }
                        ]
                    }
                }
            },
            {},
            "spec.compute.affinity: metadata.name is not an allowed node label",
        ),
    ],
)
def test_node_placement_comes_from_the_admins_lists(compute, serving, refusal):
    refusals = PLACEMENT.refusals("team-a", placed(compute, serving))
    if refusal is None:
        assert refusals == []
    else:
        [only] = refusals
        listed = (
            "nanorun.io/pool=team-a, nvidia.com/gpu.product"
            if "node label" in refusal
            else "nvidia.com/gpu, pool=team-a"
        )
        assert only == f"{refusal} (allowed: {listed})"


def test_without_placement_lists_any_node_placement_is_allowed():
    anything = placed(
        {
            "nodeSelector": {"x": "y"},
            "tolerations": [{"operator": "Exists"}],
            "affinity": required({"key": "k", "operator": "Exists"}),
        }
    )
    assert Policy().refusals("team-a", anything) == []
