"""A local stand-in for the Hugging Face Hub (no internet here): it answers the parquet listing API
and serves small parquet files written in each dataset's real schema."""

from __future__ import annotations

import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

HUMANEVAL_PROMPT = 'import math\n\n\ndef area(r):\n    """Area of a circle of radius r."""\n'

ROWS = {
    ("openai/gsm8k", "main", "train"): [
        {"question": "Tom has 3 bags of 4 apples. How many apples?", "answer": "3*4=<<3*4=12>>12 apples.\n#### 12"},
        {"question": "Ann had 10 pens and lost 2. How many are left?", "answer": "10-2=<<10-2=8>>8\n#### 8"},
    ],
    ("openai/gsm8k", "main", "test"): [
        {"question": "A box holds 1,200 nails; 2 boxes?", "answer": "<<1200*2=2400>>\n#### 2,400"},
    ],
    ("cais/mmlu", "all", "test"): [
        {"question": "2+2?", "subject": "math", "choices": ["3", "4", "5", "6"], "answer": 1},
        {"question": "Capital of Italy?", "subject": "geo", "choices": ["Rome", "Oslo", "Lima", "Bern"], "answer": 0},
    ],
    ("cais/mmlu", "all", "auxiliary_train"): [
        {"train": {"answer": 2, "choices": ["a", "b", "c", "d"], "question": "Pick c", "subject": ""}},
    ],
    ("allenai/ai2_arc", "ARC-Easy", "test"): [
        {"id": "e1", "question": "Which is a mammal?", "choices": {"text": ["trout", "whale", "crow"], "label": ["A", "B", "C"]}, "answerKey": "B"},
        {"id": "e2", "question": "Water freezes at?", "choices": {"text": ["0 C", "50 C", "90 C", "9 C"], "label": ["1", "2", "3", "4"]}, "answerKey": "1"},
    ],
    ("allenai/ai2_arc", "ARC-Challenge", "test"): [
        {"id": "c1", "question": "Hardest?", "choices": {"text": ["x", "y", "z", "w"], "label": ["A", "B", "C", "D"]}, "answerKey": "D"},
    ],
    ("openai/openai_humaneval", "openai_humaneval", "test"): [
        {
            "task_id": "HumanEval/0",
            "prompt": HUMANEVAL_PROMPT,
            "canonical_solution": "    return math.pi * r * r\n",
            "test": "def check(candidate):\n    assert abs(candidate(1) - 3.14159) < 1e-3\n",
            "entry_point": "area",
        }
    ],
    ("HuggingFaceTB/smol-smoltalk", "default", "train"): [
        {"messages": [{"content": "Hi!", "role": "user"}, {"content": "Hello.", "role": "assistant"}], "source": "x"},
        {"messages": [{"content": "Be terse.", "role": "system"}, {"content": "2+2?", "role": "user"}, {"content": "4", "role": "assistant"}], "source": "y"},
    ],
}  # fmt: skip


def parquet_bytes(rows: list[dict]) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    return buffer.getvalue()


class FakeHub:
    def __init__(self, rows: dict) -> None:
        self.rows = rows
        self.requests: list[str] = []
        self.extra_urls: list[str] = []  # listed for every split; point them nowhere to break a download
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hub.requests.append(self.path)
                body, status = hub.respond(self.path)
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def respond(self, path: str) -> tuple[bytes, int]:
        import json

        for (repo, config, split), rows in self.rows.items():
            if path == f"/api/datasets/{repo}/parquet/{config}/{split}":
                urls = [f"{self.url}/files/{repo}/{config}/{split}/0.parquet", *self.extra_urls]
                return json.dumps(urls).encode(), 200
            if path == f"/files/{repo}/{config}/{split}/0.parquet":
                return parquet_bytes(rows), 200
        return b"not found", 404

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_hub(monkeypatch):
    hub = FakeHub(ROWS)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield hub
    hub.close()


@pytest.fixture
def offline(monkeypatch):
    """No reachable hub: a loopback port nothing listens on (fails at once, like this machine's DNS)."""
    from tests.fixtures.s3 import free_port

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
