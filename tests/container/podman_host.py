"""podman on a Docker-less Debian host (this project's CI machines), set up for one test session.

What works there is recorded in shared/CONTAINERS.md; in short:
- podman, buildah, runc and debootstrap come from Debian's packages (installed when missing);
- podman runs with runc and cgroupfs (crun and systemd cgroups fail there) and with ulimits no
  higher than the host's hard limits (rlimits cannot be raised);
- every path podman writes (storage, run state, networks, events) lives in one scratch directory,
  so a session neither sees nor disturbs other users' containers, and is removed at the end;
- no image registry is reachable, so the base image is a Debian bootstrapped from this machine's
  apt mirror, cached as an OCI archive under `~/.cache/cats-serve/containers`.

A missing tool or a failed step fails the test with its output: CI has the network to Debian and
PyPI, so none of this is a reason to skip.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import resource
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

DEBIAN_PACKAGES = (
    "podman",
    "buildah",
    "runc",
    "debootstrap",
    "netavark",
    "aardvark-dns",
    "iptables",
)
# What the server image needs from the base (docker/Dockerfile's APT_PACKAGES in CI); bootstrapped
# into the cached base so that a warm build's apt step has nothing to fetch.
BASE_PACKAGES = ("python3", "python3-venv", "gcc", "libc6-dev")
# The host's CA bundle goes into the base: TLS to PyPI passes through this network's egress proxy.
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# The base's image config (`podman import --change`, one instruction each); pip and Python's ssl
# read the bundle from these variables, not from the system store.
IMAGE_CONFIG = (
    'CMD ["/bin/bash"]',
    *(f"ENV {var}={HOST_CA_BUNDLE}" for var in ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")),
)
NPROC = 4096
CACHE_DIR = Path.home() / ".cache" / "cats-serve" / "containers"
OUTPUT_TAIL = 6000


def run(cmd: list[str], *, timeout: float, env: dict | None = None, **kwargs) -> str:
    """Run `cmd`; fail the test with the command's output when it does not exit 0."""
    try:
        out = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False, **kwargs
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"`{' '.join(cmd)}` ran past {timeout} s:\n{(e.stdout or '')[-OUTPUT_TAIL:]}")
    if out.returncode != 0:
        pytest.fail(
            f"`{' '.join(cmd)}` exited {out.returncode}:\n"
            f"{out.stdout[-OUTPUT_TAIL:]}\n{out.stderr[-OUTPUT_TAIL:]}"
        )
    return out.stdout


# ---- tools -------------------------------------------------------------------------------------


def install_tools() -> None:
    """apt-get install the container tools unless dpkg already has them all."""
    query = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package} ${db:Status-Status}\n", *DEBIAN_PACKAGES],
        capture_output=True,
        text=True,
        check=False,
    )
    installed = {
        line.split()[0] for line in query.stdout.splitlines() if line.endswith("installed")
    }
    missing = [p for p in DEBIAN_PACKAGES if p not in installed]
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.fail(f"the container test needs root and apt-get to install {missing}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update"], timeout=300, env=env)
    run(["apt-get", "install", "-y", *missing], timeout=600, env=env)


def debian_mirror() -> tuple[str, str]:
    """(codename, mirror URI) of this machine's Debian main archive, from its apt sources."""
    release = dict(
        line.split("=", 1)
        for line in Path("/etc/os-release").read_text().splitlines()
        if "=" in line
    )
    codename = release.get("VERSION_CODENAME", "").strip('"')
    if release.get("ID") != "debian" or not codename:
        pytest.fail(f"the container test bootstraps Debian and needs a Debian host, not {release}")
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        if not path.is_file():
            continue
        text = path.read_text()
        if path.suffix == ".sources":  # deb822 stanzas
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, flags=re.M))
                if (
                    codename in fields.get("Suites", "").split()
                    and "main" in fields.get("Components", "").split()
                ):
                    return codename, fields["URIs"].split()[0]
        else:  # one-line style: deb [options] URI suite components...
            for line in text.splitlines():
                words = re.sub(r"\[[^]]*\]", "", line).split()
                if words[:1] == ["deb"] and words[2:3] == [codename] and "main" in words[3:]:
                    return codename, words[1]
    pytest.fail(f"no apt source for Debian {codename} main in {[str(p) for p in sources]}")


# ---- podman, confined to a scratch directory ----------------------------------------------------


def _ulimit(kind: int) -> str:
    """`soft:hard` at the host's hard limit: a container may not exceed what the host allows."""
    _, hard = resource.getrlimit(kind)
    value = -1 if hard == resource.RLIM_INFINITY else hard
    return f"{value}:{value}"


@dataclass
class Podman:
    scratch: Path
    env: dict[str, str]

    def __call__(self, *args: str, timeout: float = 120) -> str:
        return run(["podman", *args], timeout=timeout, env=self.env)

    def logs(self, container: str) -> str:
        """The container's last lines of output, for failure messages."""
        out = subprocess.run(
            ["podman", "logs", "--tail", "80", container],
            capture_output=True,
            text=True,
            env=self.env,
            check=False,
        )
        return out.stdout + out.stderr

    def logged(self, args: list[str], log: Path, timeout: float) -> None:
        """A long podman command (a build) with its output in `log`; the tail on failure."""
        with log.open("w") as out:
            try:
                code = subprocess.run(
                    ["podman", *args],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=self.env,
                    timeout=timeout,
                    check=False,
                ).returncode
            except subprocess.TimeoutExpired:
                code = f"nothing (killed after {timeout} s)"
        if code != 0:
            tail = log.read_text()[-OUTPUT_TAIL:]
            pytest.fail(f"`podman {' '.join(args)}` exited {code}:\n{tail}")


def configure(scratch: Path) -> Podman:
    """containers.conf and storage.conf for this host, with every path inside `scratch`."""
    conf = scratch / "containers.conf"
    conf.write_text(
        "[containers]\n"
        # nofile at the host's hard limit: podman's default is above it, and runc may not raise
        # it. nproc explicitly too: podman's default and values near the host's limit failed in
        # runc here at times ("error setting rlimit type 6"); a few thousand always worked, far
        # more than the server's or Prometheus's threads.
        f'default_ulimits = ["nofile={_ulimit(resource.RLIMIT_NOFILE)}", "nproc={NPROC}:{NPROC}"]\n'
        "[engine]\n"
        'cgroup_manager = "cgroupfs"\n'
        'events_logger = "file"\n'
        'runtime = "runc"\n'
        f'tmp_dir = "{scratch}/tmp"\n'
        "[network]\n"
        f'network_config_dir = "{scratch}/networks"\n'
    )
    storage = scratch / "storage.conf"
    storage.write_text(
        "[storage]\n"
        'driver = "overlay"\n'
        f'graphroot = "{scratch}/storage"\n'
        f'runroot = "{scratch}/run"\n'
    )
    env = {**os.environ, "CONTAINERS_CONF": str(conf), "CONTAINERS_STORAGE_CONF": str(storage)}
    return Podman(scratch, env)


def base_image(podman: Podman) -> str:
    """A local Debian base (minbase + BASE_PACKAGES + the host's CA bundle), loaded from the
    cache or bootstrapped from this machine's mirror and cached; returns its name."""
    codename, mirror = debian_mirror()
    if not HOST_CA_BUNDLE.is_file():
        pytest.fail(f"{HOST_CA_BUNDLE} is missing: the image's pip would not trust the proxy")
    recipe = [codename, mirror, *BASE_PACKAGES, *IMAGE_CONFIG, HOST_CA_BUNDLE.read_text()]
    key = hashlib.sha256("\n".join(recipe).encode()).hexdigest()[:12]
    name = f"localhost/cats-ci-debian:{codename}-{key}"
    archive = CACHE_DIR / f"debian-{codename}-{key}.oci.tar"
    if not archive.is_file():
        _bootstrap(podman, name, codename, mirror, archive)
    loaded = podman("load", "--input", str(archive), timeout=300)
    match = re.search(r"Loaded image(?:\(s\))?:\s*(\S+)", loaded)
    if not match:
        pytest.fail(f"podman load {archive} named no image:\n{loaded}")
    podman("tag", match.group(1).split(",")[0], name)
    return name


def _bootstrap(podman: Podman, name: str, codename: str, mirror: str, archive: Path) -> None:
    rootfs = podman.scratch / "rootfs"
    run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(BASE_PACKAGES)}",
            codename,
            str(rootfs),
            mirror,
        ],
        timeout=900,
    )
    certs = rootfs / HOST_CA_BUNDLE.parent.relative_to("/")
    certs.mkdir(parents=True, exist_ok=True)
    shutil.copy(HOST_CA_BUNDLE, certs / HOST_CA_BUNDLE.name)
    for cached in ("var/lib/apt/lists", "var/cache/apt/archives"):
        for path in (rootfs / cached).glob("*"):
            if path.is_file():
                path.unlink()
    tarball = podman.scratch / "rootfs.tar"
    run(["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(tarball), "."], timeout=300)
    shutil.rmtree(rootfs)
    changes = [arg for change in IMAGE_CONFIG for arg in ("--change", change)]
    podman("import", *changes, str(tarball), name, timeout=300)
    tarball.unlink()
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    partial = archive.with_suffix(".partial")
    podman("save", "--format", "oci-archive", "--output", str(partial), name, timeout=300)
    partial.rename(archive)  # atomic: a run killed mid-save leaves no half archive behind


# ---- the Docker-compatible API ------------------------------------------------------------------


@contextlib.contextmanager
def docker_api(podman: Podman, timeout: float = 60) -> Iterator[str]:
    """`podman system service` on a socket in the scratch dir; yields its DOCKER_HOST and stops
    the service (by its pid) afterwards."""
    sock = podman.scratch / "podman.sock"
    log = podman.scratch / "podman-service.log"
    with log.open("w") as out:
        service = subprocess.Popen(
            ["podman", "system", "service", "--time=0", f"unix://{sock}"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=podman.env,
        )
    try:
        deadline = time.monotonic() + timeout
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock))) as client:
            while True:
                if service.poll() is not None:
                    pytest.fail(f"podman system service exited:\n{log.read_text()}")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get("http://podman/_ping", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    pytest.fail(f"podman's API gave no answer in {timeout} s:\n{log.read_text()}")
                time.sleep(0.3)
        yield f"unix://{sock}"
    finally:
        service.terminate()
        try:
            service.wait(timeout=30)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait()


# ---- clean-up ----------------------------------------------------------------------------------


def reset(podman: Podman) -> None:
    """Remove every container, image and volume of this session's storage and unmount it."""
    podman("rm", "--all", "--force", "--volumes", timeout=120)
    podman("system", "reset", "--force", timeout=300)


def remove_idle_netavark_chains() -> bool:
    """Delete netavark's iptables chains when no network uses them any more.

    netavark removes a network's own chains with its last container but leaves the shared ones
    (and the jumps into them). They are idle when they hold nothing but netavark's fixed rules
    (no per-network chain or port forwarding left), which is when deleting them is safe: netavark
    recreates them with its next container, including another user's.

    Returns whether no netavark chain is left.
    """
    if not shutil.which("iptables"):
        return True
    tables = ("filter", "nat")
    rules = {t: run(["iptables", "-t", t, "-S"], timeout=30).splitlines() for t in tables}
    in_use = [
        r
        for table in rules.values()
        for r in table
        if r.startswith("-A NETAVARK")
        and not re.match(r"-A NETAVARK-HOSTPORT-(MASQ|SETMARK) .*(MASQUERADE|MARK --set-xmark)", r)
    ]
    if in_use:
        return False
    for table, lines in rules.items():
        for line in lines:  # jumps from the built-in chains first, then the chains themselves
            if line.startswith("-A ") and "-j NETAVARK" in line:
                run(["iptables", "-t", table, "-D", *shlex.split(line)[1:]], timeout=30)
        for line in lines:
            if line.startswith("-N NETAVARK"):
                chain = line.split()[1]
                run(["iptables", "-t", table, "-F", chain], timeout=30)
                run(["iptables", "-t", table, "-X", chain], timeout=30)
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scratch_dir() -> Path:
    """Outside pytest's rotating tmp dirs: overlay mounts live here until reset() unmounts them."""
    return Path(tempfile.mkdtemp(prefix="cats-serve-containers-"))
