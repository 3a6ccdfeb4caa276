"""The sockets the project itself opens: rendezvous stores bound to one address, never to every
interface.

torch's `TCPStore` server (the rendezvous of every torch.distributed group: the learners' FSDP
group, the weight-sync group) listens on all interfaces (`::`) whatever host it is given; a socket
bound by us and handed over (`master_listen_fd`) keeps it on the address asked for: loopback for a
local run, the node's own address on a cluster. Gloo's data connections follow
`GLOO_SOCKET_IFNAME`, which `use_loopback_gloo` points at the loopback interface."""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
from typing import Any

LOOPBACK = "127.0.0.1"


def is_loopback(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host == "localhost"
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_loopback


def store_server(host: str, port: int, world_size: int, timeout_s: float) -> Any:
    """A TCPStore server listening on `host` only (port 0: any free port; `.port` tells)."""
    import torch.distributed as dist

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    port = sock.getsockname()[1]
    return dist.TCPStore(
        host,
        port,
        world_size,
        is_master=True,
        timeout=datetime.timedelta(seconds=timeout_s),
        wait_for_workers=False,
        master_listen_fd=sock.detach(),  # the store owns the socket from here
    )


def loopback_interface() -> str | None:
    """The name of the loopback network interface (lo on Linux, lo0 on macOS), if any."""
    try:
        import psutil
    except ImportError:
        return "lo" if os.path.exists("/sys/class/net/lo") else None
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == LOOPBACK for a in addresses):
            return name
    return None


def use_loopback_gloo() -> None:
    """Gloo's connections on the loopback interface (unless the user chose one)."""
    name = loopback_interface()
    if name is not None:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", name)


def init_process_group(
    backend: str, init_method: str, rank: int, world_size: int, timeout_s: float = 1800.0
) -> None:
    """torch.distributed.init_process_group whose rendezvous store (rank 0's) listens only on the
    address of `init_method` (tcp://HOST:PORT, or env:// with MASTER_ADDR / MASTER_PORT)."""
    from urllib.parse import urlparse

    import torch.distributed as dist

    if init_method.startswith("tcp://"):
        url = urlparse(init_method)
        host, port = url.hostname, url.port
    elif init_method == "env://":
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    else:
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)
        return
    if rank == 0:
        store = store_server(host, port, world_size, timeout_s)
    else:
        store = dist.TCPStore(
            host, port, world_size, is_master=False, timeout=datetime.timedelta(seconds=timeout_s)
        )
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)
