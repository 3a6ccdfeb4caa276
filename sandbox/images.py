"""Base images for the docker sandbox, built locally (no registry needed).

- `cwm-rl/host:latest`: an almost empty root file system (merged-/usr symlinks, a minimal /etc)
  whose label asks the sandbox to bind the host's /usr read-only. It builds in well under a
  second and starts as fast as any container; programs get the host's python3, git and bash.
  Needs a merged-/usr host (Debian 12, Ubuntu 22.04+, Fedora...). Nothing else of the host is
  visible, but what lies under the host's /usr is readable inside.
- `cwm-rl/debian:bookworm`: a self-contained Debian with python3, git and bash, made by
  `mmdebstrap` (about a minute and a network path to a Debian mirror); for hosts where the
  host image cannot work or when the sandbox must not see the host's /usr.

`python -m launch.images [--debian] [--rebuild] [--podman-cli]` builds what is missing
(through the Docker API, or the podman CLI where docker-py is not installed yet).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from typing import Any

HOST_IMAGE = "cwm-rl/host:latest"
DEBIAN_IMAGE = "cwm-rl/debian:bookworm"
HOST_MOUNTS_LABEL = "cwm-rl.host-mounts"  # comma-separated host paths to bind read-only
IMAGE_HINT = "build it with `python -m launch.images` (or run sandbox/host_setup.sh as root)"
DEBIAN_PACKAGES = ("python3", "git", "bash", "ca-certificates", "procps")
IMAGE_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Top-level directories that a merged-/usr host makes symlinks into /usr.
MERGED_USR_LINKS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
EMPTY_DIRS = ("dev", "proc", "sys", "run", "var", "var/tmp", "home", "root", "work", "sandbox")

ETC_PASSWD = (
    b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
)
ETC_GROUP = b"root:x:0:\nnogroup:x:65534:\n"
ETC_HOSTS = b"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"


def host_rootfs_tar(host_root: str = "/") -> bytes:
    """The root file system of the host image as a tar archive (a few kB).

    Raises RuntimeError on a host without merged /usr or without /bin/sh under /usr."""
    links = {}
    for name in MERGED_USR_LINKS:
        path = os.path.join(host_root, name)
        if os.path.islink(path):
            target = os.readlink(path)
            if not target.lstrip("/").startswith("usr/"):
                raise RuntimeError(f"/{name} -> {target} does not point into /usr")
            links[name] = target.lstrip("/")
        elif os.path.isdir(path) and name in ("bin", "lib"):
            raise RuntimeError(
                f"/{name} is a directory, not a link into /usr: this host has no merged /usr, "
                "so the host image would miss its programs; build the Debian image (--debian)"
            )
    if not os.path.exists(os.path.join(host_root, "usr/bin/sh")):
        raise RuntimeError("the host has no /usr/bin/sh")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:

        def add(name: str, kind: bytes, mode: int, data: bytes = b"", link: str = "") -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.linkname, info.mtime = kind, mode, link, time.time()
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)

        for name in ("usr", "etc", *EMPTY_DIRS):
            add(name, tarfile.DIRTYPE, 0o755)
        add("tmp", tarfile.DIRTYPE, 0o1777)
        for name, target in links.items():
            add(name, tarfile.SYMTYPE, 0o777, link=target)
        add("etc/passwd", tarfile.REGTYPE, 0o644, ETC_PASSWD)
        add("etc/group", tarfile.REGTYPE, 0o644, ETC_GROUP)
        add("etc/hosts", tarfile.REGTYPE, 0o644, ETC_HOSTS)
        ld_cache = os.path.join(host_root, "etc/ld.so.cache")
        if os.path.isfile(ld_cache):  # where the loader finds the host's libraries
            with open(ld_cache, "rb") as f:
                add("etc/ld.so.cache", tarfile.REGTYPE, 0o644, f.read())
    return buffer.getvalue()


def _split_name(name: str) -> tuple[str, str]:
    repository, _, tag = name.rpartition(":")
    if not repository or "/" in tag:
        return name, "latest"
    return repository, tag


def image_exists(client: Any, name: str) -> bool:
    """Whether `name` exists; `client` is a docker-py client, or None for the podman CLI."""
    if client is None:
        return subprocess.run(["podman", "image", "exists", name]).returncode == 0
    import docker

    try:
        client.images.get(name)
    except docker.errors.ImageNotFound:
        return False
    return True


def import_rootfs(client: Any, rootfs: bytes | str, changes: list[str], name: str) -> str:
    """Import a root file system (tar bytes, or a tar file's path) as image `name`.

    `client` is a docker-py client, or None for the podman CLI (no docker-py needed)."""
    if client is None:
        command = ["podman", "import", "--quiet", *(f"--change={c}" for c in changes)]
        command += ["-" if isinstance(rootfs, bytes) else rootfs, name]
        data = rootfs if isinstance(rootfs, bytes) else None
        done = subprocess.run(command, input=data, capture_output=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"podman import failed: {done.stderr.decode(errors='replace')}")
        return done.stdout.decode().strip()
    if isinstance(rootfs, bytes):
        response = client.api.import_image_from_data(rootfs, changes=changes)
    else:
        response = client.api.import_image_from_file(rootfs, changes=changes)
    # Podman ignores import's repository/tag: tag the id it answers with.
    image_id = None
    for line in str(response).splitlines():
        try:
            message = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "error" in message:
            raise RuntimeError(f"image import failed: {message['error']}")
        image_id = message.get("id") or message.get("status") or image_id
    if not image_id:
        raise RuntimeError(f"image import gave no image id: {str(response)[:300]}")
    repository, tag = _split_name(name)
    client.api.tag(image_id, repository, tag)
    return client.images.get(name).id


def build_host_image(client: Any, name: str = HOST_IMAGE) -> str:
    """Import the host image (see the module docstring); returns its id."""
    changes = [f"LABEL {HOST_MOUNTS_LABEL}=/usr", f"ENV {IMAGE_ENV}", 'CMD ["/bin/sh"]']
    return import_rootfs(client, host_rootfs_tar(), changes, name)


def build_debian_image(
    client: Any,
    name: str = DEBIAN_IMAGE,
    suite: str = "bookworm",
    packages: tuple[str, ...] = DEBIAN_PACKAGES,
    mirror: str | None = None,
) -> str:
    """Bootstrap Debian with mmdebstrap (as root) and import it; returns the image id."""
    if shutil.which("mmdebstrap") is None:
        raise RuntimeError("mmdebstrap is not installed (apt-get install mmdebstrap)")
    with tempfile.TemporaryDirectory(prefix="cwm-rootfs-") as tmp:
        rootfs = os.path.join(tmp, "rootfs.tar")
        command = [
            "mmdebstrap",
            "--quiet",
            "--variant=apt",
            f"--include={','.join(packages)}",
            "--aptopt=Acquire::Retries 3",
            suite,
            rootfs,
        ]
        if mirror:
            command.append(mirror)
        subprocess.run(command, check=True)
        changes = [f"ENV {IMAGE_ENV}", 'CMD ["/bin/bash"]']
        return import_rootfs(client, rootfs, changes, name)


BUILDERS = {HOST_IMAGE: build_host_image, DEBIAN_IMAGE: build_debian_image}


def ensure_image(client: Any, name: str, rebuild: bool = False) -> bool:
    """Build `name` (one of BUILDERS) if it is missing or `rebuild`; True if it was built.
    `client`: a docker-py client, or None for the podman CLI."""
    if name not in BUILDERS:
        raise ValueError(f"no recipe for image {name!r}; known: {', '.join(BUILDERS)}")
    if not rebuild and image_exists(client, name):
        return False
    BUILDERS[name](client)
    return True
