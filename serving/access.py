"""Who may call the chat API, and how much: API keys, a request size cap and per-key rate limits.

`AccessGuard` is an ASGI middleware in front of the app's routes. For each HTTP request it checks,
in this order:

1. **API key** (routes under `/v1` and `/api`): `Authorization: Bearer <key>` (RFC 6750 §2.1, the
   header the `openai` client sends for `api_key=`) must carry one of the keys in the keys file.
   No key, or a wrong one, is a 401 with `WWW-Authenticate: Bearer realm="nanorun"` (and
   `error="invalid_token"` for a wrong key, RFC 6750 §3). Keys are compared by their SHA-256
   digests with `hmac.compare_digest`, so the time a comparison takes says nothing about a key.
   `/healthz`, `/metrics`, the web UI's pages and static files (`/`, `/static/*`, `/explain/*`)
   and the OpenAPI description (`/openapi.json`, `/docs`) stay open: probes and Prometheus carry no
   key, and the pages ask the browser's user for one.
2. **Rate limit** (the same routes): a token bucket per key, `rate_limit_per_minute` requests a
   minute with bursts of as many; over it, a 429 (RFC 6585 §4) with `Retry-After` in seconds
   (RFC 9110 §10.2.3). With unauthenticated access allowed the bucket is per client address
   as this process sees it. The buckets live in the replica's process: with N replicas a key may
   make up to N times the limit in all.
3. **Request size** (every route): a body over `max_request_bytes` is a 413 (RFC 9110 §15.5.14)
   before anything parses it: at once when `Content-Length` says so, else after counting the bytes
   of a chunked body as they arrive (the body is held here, at most the cap, and then handed on).

Refusals use OpenAI's error body (`{"error": {"message", "type", "param", "code"}}`, as the rest of
the API) and count in `nanorun_serve_refused_requests_total{reason}` (`unauthorized`, `too_large`,
`rate_limited`).

The keys file is a text file with one key per line (blank lines and lines starting with `#` are
skipped), or a directory, as a Kubernetes Secret mounted as a volume is: every file in it whose
name does not start with `.` holds keys the same way, so a Secret may keep one key per data value,
several per value, or both. A key is at least `MIN_KEY_CHARS` characters of RFC 6750's `b64token`
alphabet (letters, digits, `-._~+/`, trailing `=`); other lines are skipped with a warning naming
their line, never their text. The file is read again when it changes (checked by `stat` on each
request), so keys rotate without a restart: the kubelet updates a mounted Secret's files in place.
A keys file that is missing or holds no key refuses every request (fail closed).

    policy = AccessPolicy.create(api_keys_file="/etc/nanorun/api-keys", max_request_bytes=1 << 20,
                                 rate_limit_per_minute=120)
    app.add_middleware(AccessGuard, policy=lambda: policy)
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanorun.serving import SERVE_MAX_REQUEST_BYTES, SERVE_RATE_LIMIT_PER_MINUTE
from nanorun.serving.api import error_body
from starlette.responses import JSONResponse

log = logging.getLogger("nanorun.serving")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PROTECTED_PREFIXES = ("/v1", "/api")
DEFAULT_MAX_REQUEST_BYTES = SERVE_MAX_REQUEST_BYTES
DEFAULT_RATE_LIMIT_PER_MINUTE = SERVE_RATE_LIMIT_PER_MINUTE
MIN_KEY_CHARS = 16
REALM = "nanorun"
# RFC 6750 §2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
KEY_PATTERN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
MAX_BUCKETS = 65536  # clients remembered by the rate limiter; the least recently seen go first
BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def is_protected(path: str) -> bool:
    """Whether a route needs a key (and counts against the rate limit)."""
    return any(path == prefix or path.startswith(prefix + "/") for prefix in PROTECTED_PREFIXES)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def parse_keys(text: str, source: str = "") -> list[str]:
    """The keys in a keys file's text: one per line; blank lines and `#` comments skipped, lines
    that are not a key logged by number (their text may be a key with a typo) and skipped."""
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if len(line) < MIN_KEY_CHARS or not KEY_PATTERN.fullmatch(line):
            log.warning(
                "%s line %d is not an API key (at least %d characters of A-Z a-z 0-9 - . _ ~ + /, then "
                "any '='): skipped",
                source or "API keys",
                number,
                MIN_KEY_CHARS,
            )
            continue
        keys.append(line)
    return keys


class KeysFile:
    """The keys in a file or a directory of files (see the module doc), read again when it changes."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._signature: tuple[Any, ...] | None = None
        self._digests: tuple[bytes, ...] = ()

    def _files(self) -> list[Path]:
        if self.path.is_dir():
            return sorted(p for p in self.path.iterdir() if not p.name.startswith(".") and p.is_file())
        return [self.path]

    def _stat(self) -> tuple[Any, ...]:
        """What changes when the keys do: each file's name, inode, mtime and size (a Secret volume's
        files are symlinks into a directory the kubelet swaps, so they change inode)."""
        try:
            signature = []
            for path in self._files():
                st = path.stat()
                signature.append((path.name, st.st_ino, st.st_mtime_ns, st.st_size))
            return tuple(signature)
        except OSError as err:
            return (("error", err.errno),)

    def digests(self) -> tuple[bytes, ...]:
        """SHA-256 digests of the current keys (empty: no key is valid)."""
        signature = self._stat()
        if signature == self._signature:
            return self._digests
        with self._lock:
            if signature != self._signature:
                self._digests = self._read()
                self._signature = signature
        return self._digests

    def _read(self) -> tuple[bytes, ...]:
        keys: list[str] = []
        try:
            for path in self._files():
                keys += parse_keys(path.read_text(encoding="utf-8", errors="replace"), str(path))
        except OSError as err:
            log.error(
                "API keys not readable at %s (%s): every request needing a key is refused", self.path, err
            )
            return ()
        if not keys:
            log.error("no API key in %s: every request needing a key is refused", self.path)
        else:
            log.info("%d API key%s loaded from %s", len(keys), "" if len(keys) == 1 else "s", self.path)
        return tuple(dict.fromkeys(_digest(k) for k in keys))

    def match(self, presented: str) -> bytes | None:
        """The digest of `presented` when it is one of the keys, else None. Every key is compared,
        each in constant time, whichever matches."""
        candidate = _digest(presented)
        found = None
        for digest in self.digests():
            if hmac.compare_digest(candidate, digest):
                found = digest
        return found


class RateLimiter:
    """A token bucket per client: `per_minute` tokens a minute, holding at most `per_minute`."""

    def __init__(
        self, per_minute: int, clock: Callable[[], float] = time.monotonic, max_buckets: int = MAX_BUCKETS
    ) -> None:
        if per_minute < 1:
            raise ValueError("per_minute must be at least 1 (no limiter means no limit)")
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0  # tokens a second
        self.clock = clock
        self.max_buckets = max_buckets
        self._buckets: OrderedDict[Any, tuple[float, float]] = OrderedDict()  # who -> (tokens, when)
        self._lock = threading.Lock()

    def acquire(self, who: Any) -> float:
        """Take a token for `who`: 0 when it had one, else the seconds until it will."""
        now = self.clock()
        with self._lock:
            tokens, then = self._buckets.pop(who, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - then) * self.rate)
            wait = 0.0
            if tokens >= 1:
                tokens -= 1
            else:
                wait = (1 - tokens) / self.rate
            self._buckets[who] = (tokens, now)
            while len(self._buckets) > self.max_buckets:
                self._buckets.popitem(last=False)
            return wait


@dataclass
class AccessPolicy:
    """A replica's rules: its keys (None: unauthenticated access allowed), the body cap and the
    rate limiter (None: unlimited)."""

    keys: KeysFile | None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    limiter: RateLimiter | None = None
    refused: Callable[[str], None] = field(default=lambda reason: None)

    @classmethod
    def create(
        cls,
        api_keys_file: str | None = None,
        allow_unauthenticated: bool = False,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        rate_limit_per_minute: int = DEFAULT_RATE_LIMIT_PER_MINUTE,
        refused: Callable[[str], None] | None = None,
    ) -> AccessPolicy:
        if bool(api_keys_file) == allow_unauthenticated:
            raise ValueError("give exactly one of api_keys_file and allow_unauthenticated")
        return cls(
            keys=KeysFile(api_keys_file) if api_keys_file else None,
            max_request_bytes=max_request_bytes,
            limiter=RateLimiter(rate_limit_per_minute) if rate_limit_per_minute > 0 else None,
            refused=refused or (lambda reason: None),
        )


def bearer_token(scope: Scope) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (the scheme is case-insensitive)."""
    for name, value in scope.get("headers") or ():
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


def _header(scope: Scope, wanted: bytes) -> str | None:
    for name, value in scope.get("headers") or ():
        if name == wanted:
            return value.decode("latin-1")
    return None


def _route(scope: Scope) -> str:
    path = scope.get("path", "")
    root = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


async def _reply(
    send: Send,
    status: int,
    message: str,
    type_: str,
    code: str,
    headers: dict[str, str] | None = None,
) -> None:
    response = JSONResponse(error_body(message, type_, code=code), status_code=status, headers=headers)
    await send(
        {"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers}
    )
    await send({"type": "http.response.body", "body": response.body})


async def _read_body(receive: Receive, limit: int) -> list[Message] | None:
    """Every message of the request body, or None once it passes `limit` bytes."""
    messages: list[Message] = []
    size = 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages  # the client went away; the app sees that
        size += len(message.get("body", b""))
        if size > limit:
            return None
        if not message.get("more_body", False):
            return messages


class AccessGuard:
    """The ASGI middleware: `policy()` gives the replica's `AccessPolicy` (None: not configured yet,
    and every protected route answers 503)."""

    def __init__(self, app: ASGIApp, policy: Callable[[], AccessPolicy | None]) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        policy = self.policy()
        protected = is_protected(_route(scope))
        if protected and policy is None:
            await _reply(
                send, 503, "the service has no access policy yet", "service_unavailable", "not_ready"
            )
            return
        if policy is None:
            await self.app(scope, receive, send)
            return
        if protected and not await self._admit(policy, scope, send):
            return
        limit = policy.max_request_bytes
        length = _header(scope, b"content-length")
        if length is not None and length.strip().isdigit() and int(length) > limit:
            await self._too_large(policy, send)
            return
        chunked = _header(scope, b"transfer-encoding") is not None
        if scope.get("method", "GET") not in BODY_METHODS and length is None and not chunked:
            await self.app(scope, receive, send)
            return
        messages = await _read_body(receive, limit)
        if messages is None:
            await self._too_large(policy, send)
            return

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _admit(self, policy: AccessPolicy, scope: Scope, send: Send) -> bool:
        """Check the key and take a rate-limit token; False after answering the refusal."""
        who: Any
        if policy.keys is not None:
            token = bearer_token(scope)
            if token is None:
                policy.refused("unauthorized")
                await _reply(
                    send,
                    401,
                    "this service needs an API key: send it as 'Authorization: Bearer <key>' "
                    "(the openai client's api_key)",
                    "invalid_request_error",
                    "missing_api_key",
                    {"WWW-Authenticate": f'Bearer realm="{REALM}"'},
                )
                return False
            who = policy.keys.match(token)
            if who is None:
                policy.refused("unauthorized")
                await _reply(
                    send,
                    401,
                    "the API key is not valid",
                    "invalid_request_error",
                    "invalid_api_key",
                    {"WWW-Authenticate": f'Bearer realm="{REALM}", error="invalid_token"'},
                )
                return False
        else:
            client = scope.get("client")
            who = client[0] if client else "unknown"
        if policy.limiter is not None:
            wait = policy.limiter.acquire(who)
            if wait > 0:
                policy.refused("rate_limited")
                seconds = max(1, math.ceil(wait))
                per_minute = int(policy.limiter.capacity)
                await _reply(
                    send,
                    429,
                    f"rate limit reached: {per_minute} requests per minute per "
                    f"{'key' if policy.keys is not None else 'client address'}; retry in {seconds} s",
                    "requests",
                    "rate_limit_exceeded",
                    {"Retry-After": str(seconds)},
                )
                return False
        return True

    async def _too_large(self, policy: AccessPolicy, send: Send) -> None:
        policy.refused("too_large")
        await _reply(
            send,
            413,
            f"the request body is larger than this service accepts ({policy.max_request_bytes} bytes)",
            "invalid_request_error",
            "request_too_large",
        )


_replica_policy: AccessPolicy | None = None


def configure(policy: AccessPolicy) -> None:
    """Set this process's policy (a Ray Serve replica's constructor does, once)."""
    global _replica_policy
    _replica_policy = policy


def replica_policy() -> AccessPolicy | None:
    """This process's policy. The app's middleware reaches it through this function, as it reaches
    the metrics through `serve_metrics()`: Ray Serve's ingress copies the app module's globals."""
    return _replica_policy
