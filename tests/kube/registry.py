"""The registry the test cluster's nodes pull every image from, and the images pushed to it.

The `Registry` is the upstream distribution registry (built by tests/kube/build.sh) on plain HTTP,
listening on the cluster namespace's uplink address, port 5000. Every node's containerd resolves
every registry host to it (tests/kube/kubelet.py writes a `_default` hosts.toml, as an air-gapped
cluster points all pulls at its mirror), so pods keep their images' real names
(`registry.k8s.io/coredns/coredns:v1.15.0`, `ghcr.io/nanorun/nanorun-trainer:0.1.0`) and an image
nobody pushed fails to pull (`ErrImagePull`). An image `host/path:tag` is pushed as `path:tag`
(`docker.io/library/` for a bare Docker Hub name, as Docker resolves it).

Its storage is a cache folder kept between runs (`REGISTRY_CACHE`): a push uploads only the layers
the registry does not hold yet, so after the first run a push of the 7 GB trainer image takes a
moment. Two clusters on this machine share it; the registry's uploads are content-addressed. Each
rebuild of an image leaves its previous manifest untagged, so before serving, a registry that has the
storage to itself runs distribution's garbage collector (`registry garbage-collect
--delete-untagged`), which deletes those manifests and the layers only they used; pushes hold the
storage's lock shared (`Registry.pushing`), so the collector never runs beside one.

What is pushed, by `push_cluster_images` when the cluster starts:

- the controllers and CoreDNS, each packaged the way upstream packages it: the static binary built
  by tests/kube/build.sh on a minimal base (passwd and group with `nonroot`, 65532, a writable
  `/tmp`: what Google's distroless `static` base holds), as `/manager` (`/coredns`) with the image
  name their install manifest uses; CoreDNS's binary carries the file capability
  `cap_net_bind_service` as upstream's image sets it, so it binds port 53 as `nonroot`;
- `busybox`: Debian's statically linked busybox (package busybox-static) with its applets linked
  into /bin;
- the pause image the nodes' sandboxes run (Kubernetes' build/pause, built statically);
- nanorun's images and the test images (tests/kube/images/Dockerfile) from the image builder's
  storage (`make images`), with `podman push` (zstd layers): `Registry.push_local`. The test image
  `init` is pushed as `alpine:3.10`, the training-operator's init container image: its worker's
  init container waits with `nslookup` for the master's name, and busybox's nslookup exits 1 when
  any search domain answers NXDOMAIN, so the image holds BIND's nslookup from Debian's packages.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import socket
import struct
import subprocess
import tarfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.kube.controllers import manifest_docs
from tests.kube.host import ControlPlaneError, Network, _log_tail, _spawn, nsenter_argv, wait_or_kill

REGISTRY_PORT = 5000
PUSH_ADDRESS = "127.0.0.1:15000"  # see Registry.push_local
PUSH_LOCK = Path("/run/nanorun-registry-push.lock")
REGISTRY_CACHE = Path(os.environ.get("NANORUN_REGISTRY_CACHE", Path.home() / ".cache/nanorun/registry"))
BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static
PAUSE_IMAGE = "registry.k8s.io/pause:3.10"
BUSYBOX_IMAGES = ("docker.io/library/busybox:1.36",)
# Test images pushed under the name of the upstream image they stand in for: the training-operator's
# init container image (tests/kube/images/Dockerfile, target init).
STANDS_IN_FOR = {"nanorun/nanorun-init": "docker.io/library/alpine:3.10"}
NONROOT = 65532
# The controllers' binaries (tests/kube/build.sh), by the last components of their image names in
# the install manifests, and where upstream's image puts them.
STATIC_BINARIES = {
    "coredns/coredns": ("coredns", "/coredns"),
    "training-v1/training-operator": ("training-operator.v1", "/manager"),
    "kuberay/operator": ("ray-operator", "/manager"),
    "kueue/kueue": ("kueue", "/manager"),
    "trainer/trainer-controller-manager": ("trainer-controller-manager", "/manager"),
    "jobset/jobset": ("jobset", "/manager"),
}
CAP_NET_BIND_SERVICE = 10
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar"


def repository(ref: str) -> tuple[str, str]:
    """The registry path and tag of an image reference: `ghcr.io/a/b:1` -> (`a/b`, `1`),
    `busybox:1.36` -> (`library/busybox`, `1.36`)."""
    name, _, tag = ref.rpartition(":") if ":" in ref.rsplit("/", 1)[-1] else (ref, "", "latest")
    host, _, path = name.partition("/")
    if not path or not ("." in host or ":" in host or host == "localhost"):
        host, path = "docker.io", name
    if host == "docker.io" and "/" not in path:
        path = f"library/{path}"
    return path, tag


@dataclass
class Registry:
    """A distribution registry (plain HTTP, storage in `storage`) in the cluster namespace; its
    log and configuration in `state`."""

    state: Path
    network: Network
    bin_dir: Path
    storage: Path = REGISTRY_CACHE
    detach: bool = False
    port: int = REGISTRY_PORT
    process: subprocess.Popen | None = None

    @property
    def address(self) -> str:  # host:port, reachable from this machine and from the nodes
        return f"{self.network.ns_ip}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        self.storage.mkdir(parents=True, exist_ok=True)
        config = self.state / "registry.yml"
        config.write_text(
            json.dumps(
                {
                    "version": 0.1,
                    "log": {"level": "warn"},
                    "storage": {"filesystem": {"rootdirectory": str(self.storage)}},
                    "http": {"addr": self.address},
                }
            )
        )
        log = self.state / "registry.log"
        self.collect_garbage(config)
        self.process = _spawn(
            [*nsenter_argv(self.network), str(self.bin_dir / "registry"), "serve", str(config)],
            log,
            detach=self.detach,
            env={**os.environ, "OTEL_TRACES_EXPORTER": "none"},
            cgroup=self.network.cgroup,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ControlPlaneError(f"registry exited with {self.process.returncode}:\n{_log_tail(log)}")
            try:
                with urllib.request.urlopen(f"http://{self.address}/v2/", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise ControlPlaneError(f"registry not answering at {self.address} after {timeout_s:.0f} s")

    @contextlib.contextmanager
    def pushing(self) -> Iterator[None]:
        """Holds the storage's lock shared meanwhile: no garbage collection runs during a push."""
        with open(self.storage / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_SH)
            yield

    def collect_garbage(self, config: Path) -> None:
        """Deletes the untagged manifests and the blobs no tagged image uses, when no other process
        pushes to the storage (else it leaves that for a later start). A failed collection is
        logged and changes nothing the registry serves: the collector deletes only what it has
        marked unused."""
        with open(self.storage / ".lock", "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return
            with open(self.state / "garbage-collect.log", "ab") as log:
                subprocess.run(
                    [str(self.bin_dir / "registry"), "garbage-collect", "--delete-untagged", str(config)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, "OTEL_TRACES_EXPORTER": "none"},
                    check=False,
                )

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            wait_or_kill(self.process, 10)
            self.process = None

    # --- pushing over the registry API (distribution's HTTP API v2) ----------------------------

    def _request(self, method: str, url: str, data: bytes | None = None, headers: dict | None = None):
        request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
        return urllib.request.urlopen(request, timeout=300)

    def has_blob(self, path: str, digest: str) -> bool:
        try:
            with self._request("HEAD", f"http://{self.address}/v2/{path}/blobs/{digest}"):
                return True
        except urllib.error.HTTPError as err:
            if err.code == 404:
                return False
            raise

    def push_blob(self, path: str, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if self.has_blob(path, digest):
            return digest
        with self._request("POST", f"http://{self.address}/v2/{path}/blobs/uploads/", b"") as resp:
            location = resp.headers["Location"]
        if location.startswith("/"):
            location = f"http://{self.address}{location}"
        sep = "&" if "?" in location else "?"
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(len(data))}
        with self._request("PUT", f"{location}{sep}digest={digest}", data, headers):
            pass
        return digest

    def manifest_digest(self, ref: str) -> str | None:
        """The digest of the manifest the registry holds for `ref`, or None."""
        path, tag = repository(ref)
        try:
            with self._request(
                "HEAD", f"http://{self.address}/v2/{path}/manifests/{tag}", headers={"Accept": MANIFEST_TYPE}
            ) as resp:
                return resp.headers.get("Docker-Content-Digest")
        except urllib.error.HTTPError as err:
            if err.code == 404:
                return None
            raise

    def push(self, ref: str, layers: list[bytes], config: dict) -> str:
        """Pushes an image of uncompressed `layers` (tar bytes) with the image config `config`
        (Entrypoint, User, ...) for linux/amd64 as `ref`; returns its manifest digest."""
        path, tag = repository(ref)
        descriptors = [
            {"mediaType": LAYER_TYPE, "digest": self.push_blob(path, layer), "size": len(layer)}
            for layer in layers
        ]
        image_config = json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "config": config,
                "rootfs": {"type": "layers", "diff_ids": [d["digest"] for d in descriptors]},
            },
            sort_keys=True,
        ).encode()
        manifest = {
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": self.push_blob(path, image_config),
                "size": len(image_config),
            },
            "layers": descriptors,
        }
        body = json.dumps(manifest).encode()
        with self._request(
            "PUT", f"http://{self.address}/v2/{path}/manifests/{tag}", body, {"Content-Type": MANIFEST_TYPE}
        ):
            pass
        return "sha256:" + hashlib.sha256(body).hexdigest()

    def push_local(self, ref: str) -> None:
        """Pushes an image of the image builder's storage (containers-storage: `make images`).

        podman pushes through `PUSH_ADDRESS`, a forward to this registry on a fixed loopback port:
        its cache of which registry holds which compressed layer is keyed by the registry's address,
        and the cluster's differs from run to run; through one address a push finds the layers an
        earlier run uploaded (it checks each with the registry) instead of compressing gigabytes
        again."""
        path, tag = repository(STANDS_IN_FOR.get(repository(ref)[0], ref))
        with _forward(self.address):
            out = subprocess.run(
                [
                    "podman",
                    "push",
                    "--quiet",
                    "--tls-verify=false",
                    "--compression-format=zstd",
                    ref,
                    f"docker://{PUSH_ADDRESS}/{path}:{tag}",
                ],
                capture_output=True,
                text=True,
            )
        if out.returncode != 0:
            raise ControlPlaneError(
                f"pushing {ref} failed (is it built? `make images`):\n{out.stderr.strip()}"
            )


@contextlib.contextmanager
def _forward(target: str) -> Iterator[None]:
    """Forwards TCP connections from PUSH_ADDRESS to `target` (host:port) meanwhile; a lock file
    takes turns between processes that push to different clusters."""
    host, port = PUSH_ADDRESS.split(":")
    target_host, target_port = target.split(":")
    with open(PUSH_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        server = socket.create_server((host, int(port)), reuse_port=False)
        server.settimeout(0.2)
        done = threading.Event()

        def pipe(src: socket.socket, dst: socket.socket) -> None:
            with contextlib.suppress(OSError):
                while data := src.recv(1 << 20):
                    dst.sendall(data)
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

        def accept() -> None:
            while not done.is_set():
                try:
                    client, _ = server.accept()
                except TimeoutError:
                    continue
                upstream = socket.create_connection((target_host, int(target_port)))
                for a, b in ((client, upstream), (upstream, client)):
                    threading.Thread(target=pipe, args=(a, b), daemon=True).start()

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
            server.close()


# --- images -----------------------------------------------------------------------------------


def layer(
    files: dict[str, bytes | None], owner: int = 0, xattrs: dict[str, dict[str, bytes]] | None = None
) -> bytes:
    """An uncompressed layer (tar, reproducible: fixed times and owners) of `files`: path -> content
    (a file under etc/ is 0644, any other an executable), None for a directory (mode 1777 for /tmp,
    else 0755), `->target` bytes for a symlink. `xattrs` gives files extended attributes (PAX `SCHILY.xattr.` records, which
    containerd applies when it unpacks the layer)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for member, data in sorted(files.items()):
            info = tarfile.TarInfo(member)
            info.uid = info.gid = owner if member.startswith("home/") else 0
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o1777 if member == "tmp" else 0o755
                tar.addfile(info)
            elif data.startswith(b"->"):
                info.type, info.linkname, info.mode = tarfile.SYMTYPE, data[2:].decode(), 0o777
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644 if member.startswith("etc/") else 0o755
                for name, value in (xattrs or {}).get(member, {}).items():
                    # tarfile writes a value that is not UTF-8 as raw bytes (hdrcharset=BINARY).
                    info.pax_headers[f"SCHILY.xattr.{name}"] = value.decode("utf-8", "surrogateescape")
                tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def static_base() -> bytes:
    """A minimal base for static binaries: root, nobody and nonroot (65532) users, and /tmp."""
    passwd = (
        "root:x:0:0:root:/root:/sbin/nologin\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n"
        f"nonroot:x:{NONROOT}:{NONROOT}:nonroot:/home/nonroot:/sbin/nologin\n"
    )
    group = f"root:x:0:\nnobody:x:65534:\nnonroot:x:{NONROOT}:\n"
    return layer(
        {
            "etc": None,
            "etc/passwd": passwd.encode(),
            "etc/group": group.encode(),
            "tmp": None,
            "home": None,
            "home/nonroot": None,
        },
        owner=NONROOT,
    )


def file_capability(*caps: int) -> bytes:
    """The `security.capability` xattr value (VFS_CAP_REVISION_2) of `setcap <caps>=+ep`."""
    permitted = sum(1 << c for c in caps)
    return struct.pack("<IIIII", 0x02000000 | 0x1, permitted & 0xFFFFFFFF, 0, permitted >> 32, 0)


def manifest_images(manifests: Path) -> list[str]:
    """The images of the Deployments in the controllers' install manifests."""
    refs = []
    for path in sorted(manifests.glob("*.yaml")):
        for doc in manifest_docs(path):
            if doc.get("kind") == "Deployment":
                refs += [c["image"] for c in doc["spec"]["template"]["spec"]["containers"]]
    return refs


def push_cluster_images(registry: Registry, bin_dir: Path, extra: tuple[str, ...] = ()) -> None:
    """Pushes the controllers, CoreDNS (`extra` names its image), busybox and pause images
    (see the module docstring). The images are reproducible: a record beside the binaries of the
    digests pushed last lets a registry that still holds them skip building them again."""
    record = bin_dir.parent / "pushed-images.json"
    key = hashlib.sha256(Path(__file__).read_bytes() + str(BUSYBOX.stat()).encode()).hexdigest()
    try:
        pushed = json.loads(record.read_text())
    except (OSError, ValueError):
        pushed = {}
    if pushed.get("key") == key and all(
        registry.manifest_digest(ref) == digest for ref, digest in pushed.get("digests", {}).items()
    ):
        return
    digests = {}
    base = static_base()
    for ref in [*manifest_images(bin_dir.parent / "manifests"), *extra]:
        path, _ = repository(ref)
        match = [key for key in STATIC_BINARIES if path.endswith(key)]
        if not match:
            raise ControlPlaneError(f"no binary for the image {ref} (tests/kube/registry.py STATIC_BINARIES)")
        binary, target = STATIC_BINARIES[match[0]]
        xattrs = {}
        if target == "/coredns":
            xattrs = {"coredns": {"security.capability": file_capability(CAP_NET_BIND_SERVICE)}}
        top = layer({target.lstrip("/"): (bin_dir / binary).read_bytes()}, xattrs=xattrs)
        digests[ref] = registry.push(
            ref, [base, top], {"Entrypoint": [target], "User": f"{NONROOT}:{NONROOT}"}
        )
    if not BUSYBOX.exists():
        raise ControlPlaneError(f"{BUSYBOX} is missing (Debian: apt-get install busybox-static)")
    applets = subprocess.run(
        [str(BUSYBOX), "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    busybox = layer(
        {
            "bin": None,
            "bin/busybox": BUSYBOX.read_bytes(),
            "tmp": None,
            **{f"bin/{a}": b"->busybox" for a in applets if a != "busybox"},
        }
    )
    for ref in BUSYBOX_IMAGES:
        digests[ref] = registry.push(ref, [busybox], {"Cmd": ["sh"], "Env": ["PATH=/bin"]})
    digests[PAUSE_IMAGE] = registry.push(
        PAUSE_IMAGE,
        [layer({"pause": (bin_dir / "pause").read_bytes()})],
        {"Entrypoint": ["/pause"], "User": "65535:65535"},
    )
    record.write_text(json.dumps({"key": key, "digests": digests}, indent=1))
