"""Progress reports to Kubeflow Trainer v2's status server (nanorun.pipeline.trainer_status), against
a local HTTPS server that answers as Trainer's does (github.com/kubeflow/trainer v2.3.0,
pkg/statusserver): POST to the TrainJob's status path, a bearer token it checks, a metav1.Status
body on errors. The real server, on the test cluster, is in tests/operator/test_trainjob_kube.py."""

from __future__ import annotations

import datetime
import json
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from nanorun.pipeline import trainer_status
from nanorun.pipeline.progress import Done, Progress, read_progress, write_done, write_progress
from nanorun.pipeline.trainer_status import StatusReporter, done_status
from nanorun.pipeline.trainer_status import trainer_status as status_of
from nanorun.trainer.training.metrics import TrainMetrics

PATH = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/team/trainjobs/speedrun-pretrain-1/status"


def write_ca(folder: Path, name: str) -> tuple[Path, Path, Path]:
    """A CA (`<name>-ca.crt`) and a server certificate and key for `localhost` that it signed."""
    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject: str, key, issuer: str, signer, ca: bool, sans=()) -> bytes:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        return builder.sign(signer, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    paths = folder / f"{name}-ca.crt", folder / f"{name}.crt", folder / f"{name}.key"
    paths[0].write_bytes(cert(f"{name}-ca", ca_key, f"{name}-ca", ca_key, ca=True))
    paths[1].write_bytes(
        cert("localhost", key, f"{name}-ca", ca_key, ca=False, sans=[x509.DNSName("localhost")])
    )
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return paths


@dataclass
class StatusServer:
    """Records what it is sent; answers 403 to a token other than `token`, 422 to a payload
    Trainer's validation refuses, and `fail_with` (a status code) while that is set."""

    url: str
    ca: Path
    token: str = "token-1"
    fail_with: int | None = None
    received: list[dict] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)  # cleared: requests wait
    arrived: threading.Event = field(default_factory=threading.Event)  # set by every request

    def statuses(self) -> list[dict]:
        return [r["body"]["trainerStatus"] for r in self.received]


@pytest.fixture
def status_server(tmp_path: Path) -> Iterator[StatusServer]:
    ca, crt, key = write_ca(tmp_path, "trainer")
    state = StatusServer(url="", ca=ca)
    state.release.set()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def answer(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            state.arrived.set()
            state.release.wait(30)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path != PATH:
                return self.answer(404, {"kind": "Status", "message": "Not found", "code": 404})
            if self.headers.get("Authorization") != f"Bearer {state.token}":
                return self.answer(403, {"kind": "Status", "message": "Forbidden", "code": 403})
            if state.fail_with:
                return self.answer(state.fail_with, {"kind": "Status", "message": "Internal error"})
            status = body.get("trainerStatus") or {}
            pct = status.get("progressPercentage", 0)
            if "lastUpdatedTime" not in status or not 0 <= pct <= 100:
                return self.answer(422, {"kind": "Status", "message": "lastUpdatedTime is required"})
            state.received.append({"body": body, "authorization": self.headers["Authorization"]})
            self.answer(200, body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(crt, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    state.url = f"https://localhost:{server.server_port}{PATH}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    state.release.set()
    server.shutdown()
    server.server_close()


@pytest.fixture
def token(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text("token-1\n")
    return path


def reporter_for(server: StatusServer, token: Path, **kwargs) -> tuple[StatusReporter, list[str]]:
    lines: list[str] = []
    reporter = StatusReporter(server.url, str(server.ca), str(token), log=lines.append, **kwargs)
    return reporter, lines


def progress(step: int, total: int = 100, **fields) -> Progress:
    return Progress(stage="pretrain", step=step, total_steps=total, **fields)


def test_without_trainers_settings_there_is_no_reporter():
    assert StatusReporter.from_env({}) is None
    assert StatusReporter.from_env({"KUBEFLOW_TRAINER_SERVER_URL": " "}) is None
    r = StatusReporter.from_env(
        {
            "KUBEFLOW_TRAINER_SERVER_URL": "https://trainer.kubeflow-system.svc:10443" + PATH,
            "KUBEFLOW_TRAINER_SERVER_CA_CERT": "/var/run/secrets/kubeflow/trainer/ca.crt",
            "KUBEFLOW_TRAINER_SERVER_TOKEN": "/var/run/secrets/kubeflow/trainer/token",
        }
    )
    assert r is not None and r.url.endswith(PATH) and r.token_file.endswith("/token")


def test_a_progress_record_becomes_a_trainer_status_within_the_api_s_limits():
    p = progress(
        45,
        loss=3.214567891,
        eta_seconds=795.4,
        tokens_per_sec=123456.0,
        attempt=2,
        updated_at=1_796_207_445.9,
        extra={"lr": 0.02, "message_of_the_day": "not a number", "flag": True},
    )
    status = status_of(p)
    assert status["progressPercentage"] == 45
    assert status["estimatedRemainingSeconds"] == 795
    assert status["lastUpdatedTime"] == "2026-12-02T10:30:45Z"
    assert status["metrics"] == [
        {"name": "step", "value": "45"},
        {"name": "total_steps", "value": "100"},
        {"name": "loss", "value": "3.21457"},
        {"name": "tokens_per_sec", "value": "123456"},
        {"name": "attempt", "value": "2"},
        {"name": "lr", "value": "0.02"},
    ]  # unknown values (val_bpb None, mfu None) and what is not a number are left out
    # Rounded down (99.9% is not done), clamped to the API's 0..100; no total, no percentage.
    assert status_of(progress(999, 1000))["progressPercentage"] == 99
    assert status_of(progress(120, 100))["progressPercentage"] == 100
    assert "progressPercentage" not in status_of(progress(5, 0))
    assert status_of(progress(1, eta_seconds=-3.0))["estimatedRemainingSeconds"] == 0
    assert "estimatedRemainingSeconds" not in status_of(progress(1, eta_seconds=float("nan")))
    assert [m["name"] for m in status_of(progress(1, loss=float("nan")))["metrics"]] == [
        "step",
        "total_steps",
        "attempt",
    ]
    many = status_of(progress(1, extra={f"m{i}": i for i in range(400)} | {"x" * 65: 1.0}))["metrics"]
    assert len(many) == 256 and all(len(m["name"]) <= 64 for m in many)


def test_a_finished_stage_reports_100_percent_and_done_json_s_metrics_over_the_last_progress():
    last = progress(99, loss=2.5, val_bpb=1.1, eta_seconds=3.0)
    done = Done(stage="pretrain", seconds=60.0, metrics={"val_bpb": 0.98, "core": 0.21, "per_task": {"a": 1}})
    status = done_status(done, last)
    assert status["progressPercentage"] == 100 and status["estimatedRemainingSeconds"] == 0
    values = {m["name"]: m["value"] for m in status["metrics"]}
    assert values["val_bpb"] == "0.98" and values["core"] == "0.21" and values["loss"] == "2.5"
    assert "per_task" not in values
    assert {m["name"] for m in done_status(done, None)["metrics"]} == {"val_bpb", "core"}


def test_reports_reach_the_server_with_the_token_of_the_moment_over_verified_tls(status_server, token):
    reporter, lines = reporter_for(status_server, token, interval_s=0.0)
    reporter.publish(progress(10, loss=4.0))
    assert reporter.flush(10)
    # The kubelet rotates the projected token: the next POST reads the file again.
    token.write_text("token-2")
    status_server.token = "token-2"
    assert reporter.publish_done(Done(stage="pretrain", seconds=1.0, metrics={"val_bpb": 1.5}))
    first, last = status_server.received
    assert first["authorization"] == "Bearer token-1" and last["authorization"] == "Bearer token-2"
    assert first["body"]["trainerStatus"]["progressPercentage"] == 10
    assert last["body"]["trainerStatus"]["progressPercentage"] == 100
    assert {"name": "loss", "value": "4"} in last["body"]["trainerStatus"]["metrics"]
    assert (reporter.sent, reporter.failed, lines) == (2, 0, [])


def test_records_between_two_posts_are_coalesced_into_the_newest_and_publishing_never_waits(
    status_server, token
):
    reporter, _ = reporter_for(status_server, token, interval_s=3600.0)
    status_server.release.clear()  # the server holds every request until released
    reporter.publish(progress(1))
    assert status_server.arrived.wait(30)  # the first POST is in the server's hands, held
    for step in range(2, 51):
        reporter.publish(progress(step))  # returns while the first POST is held
    assert status_server.received == []
    status_server.release.set()
    deadline = time.monotonic() + 30
    while reporter.sent + reporter.failed == 0 and time.monotonic() < deadline:  # the held POST ends
        time.sleep(0.01)
    assert reporter.flush(0.5) is False  # step 50 waits for the hour between POSTs to pass
    assert [s["progressPercentage"] for s in status_server.statuses()] == [1]
    # A finished stage's record goes at once, in place of the waiting one.
    assert reporter.publish_done(Done(stage="pretrain", seconds=1.0))
    assert [s["progressPercentage"] for s in status_server.statuses()] == [1, 100]


def test_a_preempted_attempt_s_last_record_is_sent_before_it_exits(status_server, token):
    reporter, _ = reporter_for(status_server, token, interval_s=3600.0)
    reporter.publish(progress(1))
    assert reporter.flush(10)
    assert reporter.publish(progress(7, stopped="preempted")) is True  # not held back an hour
    assert [s["progressPercentage"] for s in status_server.statuses()] == [1, 7]


def test_a_refusing_failing_or_absent_server_is_reported_once_and_never_raised(
    status_server, token, tmp_path
):
    outcomes: list[str] = []
    reporter, lines = reporter_for(status_server, token, interval_s=0.0)
    reporter.listeners.append(outcomes.append)
    status_server.token = "another pod's token"
    for step in (1, 2, 3):
        reporter.publish(progress(step))
        assert reporter.flush(10)
    assert lines == [
        f"trainer status: POST {status_server.url} failed (HTTP 403: Forbidden); training goes on, "
        "progress.json is unaffected"
    ]
    status_server.token, status_server.fail_with = "token-1", 500
    reporter.publish(progress(4))
    assert reporter.flush(10)
    assert "HTTP 500: Internal error" in lines[-1] and len(lines) == 2
    status_server.fail_with = None
    reporter.publish(progress(5))
    assert reporter.flush(10)
    assert lines[-1] == f"trainer status: reporting to {status_server.url} again"
    assert outcomes == ["failed"] * 4 + ["sent"]
    assert (reporter.sent, reporter.failed) == (1, 4)

    # A certificate of another CA, a closed port, an unreadable token: failures, not exceptions.
    _, _, _ = write_ca(tmp_path, "other")
    for url, ca, tok in (
        (status_server.url, tmp_path / "other-ca.crt", token),
        ("https://localhost:1" + PATH, status_server.ca, token),
        (status_server.url, status_server.ca, tmp_path / "missing-token"),
    ):
        broken_lines: list[str] = []
        broken = StatusReporter(url, str(ca), str(tok), interval_s=0.0, log=broken_lines.append)
        assert broken.publish_done(Done(stage="pretrain", seconds=1.0))
        assert (broken.sent, broken.failed) == (0, 1) and "failed (" in broken_lines[0], broken_lines
    assert len(status_server.received) == 1


def test_the_stage_contract_s_writers_report_when_trainers_settings_are_set(
    status_server, token, tmp_path, monkeypatch
):
    """write_progress and write_done (every stage's writers) hand their records on; progress.json
    and done.json are written as ever."""
    monkeypatch.setenv("KUBEFLOW_TRAINER_SERVER_URL", status_server.url)
    monkeypatch.setenv("KUBEFLOW_TRAINER_SERVER_CA_CERT", str(status_server.ca))
    monkeypatch.setenv("KUBEFLOW_TRAINER_SERVER_TOKEN", str(token))
    trainer_status.reporter.cache_clear()
    try:
        run_dir = str(tmp_path / "run")
        write_progress(run_dir, progress(30, loss=3.0))
        write_done(run_dir, Done(stage="pretrain", seconds=2.0, metrics={"val_bpb": 1.25}))
        assert read_progress(run_dir, "pretrain").step == 30
        statuses = status_server.statuses()
        assert statuses[-1]["progressPercentage"] == 100
        assert {"name": "val_bpb", "value": "1.25"} in statuses[-1]["metrics"]
        assert {"name": "step", "value": "30"} in statuses[-1]["metrics"]
    finally:
        trainer_status.reporter.cache_clear()
    monkeypatch.delenv("KUBEFLOW_TRAINER_SERVER_URL")
    assert trainer_status.reporter() is None
    trainer_status.reporter.cache_clear()


def test_the_trainer_s_metrics_count_reports_by_outcome():
    metrics = TrainMetrics("pretrain", 0, run="r")
    for outcome in ("sent", "sent", "failed"):
        metrics.count_status_report(outcome)
    labels = {"run": "r", "stage": "pretrain", "rank": "0"}
    get = metrics.registry.get_sample_value
    assert get("llm_train_status_reports_total", {**labels, "outcome": "sent"}) == 2
    assert get("llm_train_status_reports_total", {**labels, "outcome": "failed"}) == 1
