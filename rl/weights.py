"""Weight sync, learner -> rollout workers: what moves, in which buckets, over which transport.

Two transports, chosen by `weight_sync.method`:

- `object_store`: learner rank 0 puts buckets of Hugging Face-named tensors in Ray's object store
  and every worker fetches them (shared memory between processes of one node). Works everywhere,
  needs no set-up, and a new worker can fetch the same objects later.
- `collective`: learner rank 0 and the workers form a torch.distributed process group of their own
  (not the learners' FSDP group; gloo on CPU, NCCL where learner and workers hold GPUs) and rank 0
  broadcasts each bucket as one flat tensor. An update is a header (the bucket plan: names, shapes
  and dtypes, pickled into a byte tensor; so nothing has to be agreed in advance) followed by the
  buckets; every receiver unflattens each bucket into views of its buffer.

Either way a worker receives a whole update in one call and applies it at once, between two decode
steps (rl/rollout.py), so every token is sampled by exactly one policy version and that version's
weights are all in place when its number is stamped. Never one actor call per bucket: a rollout
worker is an async Ray actor, and Ray runs an async actor's calls out of order (each as soon as its
arguments are ready), so a per-bucket protocol applies "the last bucket" before earlier ones have
arrived (a version stamped on weights partly one update old: measured in 1 to 3 of 40 updates of
a tiny model in 4-9 buckets; once per demo run of 16 steps).

    group = WeightGroup.join(address, rank, world_size, "gloo", timeout_s)   # on every member
    send_weights(group, state_dict, bucket_bytes)                           # rank 0
    state_dict = recv_weights(group)                                        # ranks 1..N
"""

from __future__ import annotations

import collections
import datetime
import math
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from model.hf import split_state_dict
from rl.net import store_server


@dataclass
class WeightSyncConfig:
    method: str = "object_store"  # object_store | collective
    backend: str = "auto"  # collective: auto (nccl if learner and workers have GPUs) | gloo | nccl
    bucket_mb: float = 64.0  # MiB per bucket (one ray.put, or one broadcast)
    # what the learner casts the weights to before sending: auto (the rollout engine's dtype,
    # asked of a worker), or float32 | bfloat16 | float16
    dtype: str = "auto"
    # collective: forming the group, one broadcast, or a worker's ping before it; past it: an error
    timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.method not in ("object_store", "collective"):
            raise ValueError(
                f"weight_sync.method must be object_store or collective, got {self.method!r}"
            )
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ValueError(
                f"weight_sync.backend must be auto, gloo or nccl, got {self.backend!r}"
            )
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(
                f"weight_sync.dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}"
            )
        if self.bucket_mb <= 0:
            raise ValueError(f"weight_sync.bucket_mb must be > 0, got {self.bucket_mb}")
        if self.timeout_s <= 0:
            raise ValueError(f"weight_sync.timeout_s must be > 0, got {self.timeout_s}")

    @property
    def bucket_bytes(self) -> int:
        return max(1, int(self.bucket_mb * 2**20))


# -- buckets ---------------------------------------------------------------------------------------


def flatten(bucket: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> torch.Tensor:
    """One bucket (one dtype) as a single contiguous 1-D tensor on `device`."""
    return torch.cat([t.detach().reshape(-1).to(device) for t in bucket.values()])


def unflatten(
    flat: torch.Tensor, plan: list[tuple[str, tuple[int, ...]]]
) -> dict[str, torch.Tensor]:
    """Views of `flat` with the names and shapes of `plan`, in order."""
    total = sum(math.prod(shape) for _, shape in plan)
    if total != flat.numel():
        raise ValueError(f"bucket holds {flat.numel()} elements, its plan {total}")
    out, offset = {}, 0
    for name, shape in plan:
        n = math.prod(shape)
        out[name] = flat[offset : offset + n].view(shape)
        offset += n
    return out


def merge_buckets(buckets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The tensors of one update from all its buckets, in order. A name in two buckets means
    buckets of different updates were mixed: an error, never a silent overwrite."""
    out: dict[str, torch.Tensor] = {}
    for i, bucket in enumerate(buckets):
        for name, tensor in bucket.items():
            if name in out:
                raise ValueError(f"weight update: {name!r} appears twice (again in bucket {i})")
            out[name] = tensor
    return out


# -- the object store ------------------------------------------------------------------------------


def to_arrays(bucket: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A bucket as numpy arrays, which Ray's object store serialises without pickling and hands
    to readers zero-copy from shared memory (torch tensors are pickled and copied on both ends).
    numpy has no bfloat16: such tensors travel as int16 bits, their dtype under "__dtypes__"."""
    arrays: dict[str, Any] = {}
    dtypes: dict[str, str] = {}
    for name, t in bucket.items():
        t = t.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            dtypes[name] = "bfloat16"
            t = t.view(torch.int16)
        arrays[name] = t.numpy()
    arrays["__dtypes__"] = dtypes
    return arrays


def from_arrays(arrays: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The inverse of to_arrays. The tensors share the (read-only) shared-memory buffers: read
    them, copy them into parameters, never write to them."""
    import warnings

    dtypes = arrays.get("__dtypes__", {})
    out = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for name, a in arrays.items():
            if name == "__dtypes__":
                continue
            t = torch.from_numpy(a)
            out[name] = t.view(getattr(torch, dtypes[name])) if name in dtypes else t
    return out


# -- the group -------------------------------------------------------------------------------------


def host_address() -> str:
    """This node's address as other nodes of the Ray cluster reach it (loopback without Ray)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - outside a Ray worker
        pass
    return "127.0.0.1"


def resolve_backend(backend: str, learner_gpus: float, worker_gpus: float) -> str:
    """`auto`: NCCL when the learner and the workers hold GPUs, else gloo."""
    if backend == "auto":
        return "nccl" if learner_gpus > 0 and worker_gpus > 0 else "gloo"
    return backend


class WeightGroup:
    """A process group of one weight-sync source (rank 0) and its receivers. Its own TCPStore,
    served by rank 0, makes it independent of any default process group (the learners' FSDP group
    lives on beside it) and lets a new group form after a receiver died."""

    def __init__(self, pg: Any, rank: int, world_size: int, device: torch.device, store: Any):
        self.pg, self.rank, self.world_size, self.device = pg, rank, world_size, device
        self._store = store  # kept alive while the group lives

    @staticmethod
    def serve(world_size: int, timeout_s: float) -> tuple[Any, dict]:
        """Rank 0: a TCPStore on a free port of this node's address alone (left to bind its own
        socket, a TCPStore listens on every interface); returns it and the address the others
        join."""
        host = host_address()
        store = store_server(host, 0, world_size, timeout_s)  # listens on `host` only
        return store, {"host": host, "port": store.port, "world_size": world_size}

    @classmethod
    def join(
        cls,
        address: dict,
        rank: int,
        backend: str,
        timeout_s: float,
        device: torch.device | str = "cpu",
        store: Any = None,
    ) -> WeightGroup:
        """Every member calls this (they block until all have joined). Rank 0 passes the store
        from `serve`; the others connect to `address`."""
        if backend == "nccl" and not torch.cuda.is_available():
            raise RuntimeError(
                f"weight-sync rank {rank}: backend nccl needs CUDA, and this process has none"
            )
        timeout = datetime.timedelta(seconds=timeout_s)
        world_size = address["world_size"]
        if store is None:
            store = dist.TCPStore(
                address["host"], address["port"], world_size, is_master=False, timeout=timeout
            )
        device = torch.device(device)
        if backend == "gloo":
            pg = dist.ProcessGroupGloo(store, rank, world_size, timeout)
        elif backend == "nccl":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            pg = dist.ProcessGroupNCCL(store, rank, world_size, options)
        else:
            raise ValueError(f"unknown weight-sync backend {backend!r}")
        return cls(pg, rank, world_size, device, store)

    def broadcast(self, tensor: torch.Tensor, wait: bool = True) -> Any:
        """Rank 0's `tensor` into every member's; wait=False returns the pending work (ops of
        one group run in the order they were posted)."""
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        opts.rootTensor = 0
        work = self.pg.broadcast([tensor], opts)
        if wait:
            work.wait()
        return work

    def close(self) -> None:
        """Drop this member's end. The process group is destroyed with its last reference, and
        its connections with it: a peer blocked on the group fails at once ("Connection closed
        by peer") instead of waiting for the timeout. (ProcessGroupGloo.abort/shutdown do not
        free a blocked peer; measured.) The source closes its group when a broadcast fails."""
        self.pg = None


def send_weights(group: WeightGroup, sd: dict[str, torch.Tensor], bucket_bytes: int) -> int:
    """Rank 0: broadcast `sd` (a header, then one flat tensor per bucket). Buckets are posted
    without waiting, so flattening the next overlaps sending this one. Returns bytes sent."""
    buckets = split_state_dict(sd, bucket_bytes, by_dtype=True) if sd else []
    header = [
        (
            str(next(iter(b.values())).dtype).removeprefix("torch."),
            [(k, tuple(v.shape)) for k, v in b.items()],
        )
        for b in buckets
    ]
    _send_bytes(group, pickle.dumps(header))
    sent, pending = 0, []
    for bucket in buckets:
        flat = flatten(bucket, group.device)
        pending.append((group.broadcast(flat, wait=False), flat))  # flat lives until sent
        sent += flat.numel() * flat.element_size()
    for work, _ in pending:
        work.wait()
    return sent


def recv_weights(group: WeightGroup) -> dict[str, torch.Tensor]:
    """Ranks 1..N: receive one update; HF-named tensors (views of one buffer per bucket).
    Every bucket's receive is posted at once."""
    header = pickle.loads(_recv_bytes(group))
    out: dict[str, torch.Tensor] = {}
    pending = []
    for dtype, plan in header:
        n = sum(math.prod(shape) for _, shape in plan)
        flat = torch.empty(n, dtype=getattr(torch, dtype), device=group.device)
        pending.append(group.broadcast(flat, wait=False))
        out.update(unflatten(flat, plan))
    for work in pending:
        work.wait()
    return out


# -- streaming: at most two buckets in flight, whatever the model's size --------------------------

# per bucket: its dtype and its pieces (name, the tensor's shape, first and last+1 flat element)
Plan = list[tuple[str, list[tuple[str, tuple[int, ...], int, int]]]]
Piece = tuple[str, int, torch.Tensor]  # name, first flat element, the flat values


def bucket_plan(metas: list[tuple[str, tuple[int, ...], torch.dtype]], bucket_bytes: int) -> Plan:
    """The buckets of an update from its tensors' metadata alone (name, shape, dtype, in
    order), so the plan goes first and no tensor has to exist before its bucket is filled.
    Every bucket holds one dtype and at most `bucket_bytes`: a tensor that does not fit in the
    room left is split (flat, in order) and continues in the next bucket, so a bucket is never
    larger than asked for, whatever the size of the largest tensor (CWM's embedding is 1.6 GB
    in bf16)."""
    plan: Plan = []
    room = 0
    for name, shape, dtype in metas:
        key = str(dtype).removeprefix("torch.")
        per = max(1, bucket_bytes // dtype.itemsize)  # elements per bucket
        total, start = math.prod(shape), 0
        while start < total or (total == 0 and start == 0):
            if not plan or plan[-1][0] != key or room == 0:
                plan.append((key, []))
                room = per
            stop = min(total, start + room)
            plan[-1][1].append((name, tuple(shape), start, stop))
            room -= stop - start
            start = stop
            if total == 0:
                break
    return plan


def send_weights_streaming(
    group: WeightGroup, plan: Plan, tensors: Iterator[tuple[str, torch.Tensor]]
) -> int:
    """Rank 0: broadcast an update whose tensors come one at a time from `tensors` (in the
    plan's order, each whole, in any dtype: e.g. gathered from FSDP shards one parameter at a
    time). Each bucket is one flat buffer in the plan's dtype, filled piece by piece (the cast
    happens in the copy, so no cast copy of a whole tensor is made) and posted; before a
    third buffer is allocated the oldest send is waited for, so at most two buckets exist at
    once. Returns bytes sent."""
    _send_bytes(group, pickle.dumps(plan))
    sent = 0
    inflight: collections.deque = collections.deque()
    current = None
    for dtype, pieces in plan:
        if len(inflight) == 2:
            inflight.popleft()[0].wait()
        n = sum(stop - start for _, _, start, stop in pieces)
        flat = torch.empty(n, dtype=getattr(torch, dtype), device=group.device)
        offset = 0
        for name, shape, start, stop in pieces:
            if start == 0:
                current = None  # the previous tensor is done: free it before the next
                got, tensor = next(tensors)
                if got != name or tuple(tensor.shape) != shape:
                    raise RuntimeError(
                        f"weight stream: expected {name} {shape}, got {got} {tuple(tensor.shape)}"
                    )
                current = tensor.detach().reshape(-1)
            flat[offset : offset + stop - start].copy_(current[start:stop])
            offset += stop - start
        inflight.append((group.broadcast(flat, wait=False), flat))
        sent += flat.numel() * flat.element_size()
        del flat
    for work, _ in inflight:
        work.wait()
    return sent


def recv_weights_streaming(group: WeightGroup) -> tuple[Plan, Iterator[list[Piece]]]:
    """Ranks 1..N: the update's plan (read first, so a receiver can check every name and shape
    before it changes anything), and an iterator of its buckets, each a list of pieces (name,
    first flat element, a flat view of one buffer). The next bucket's receive is posted before
    a bucket is handed out, so at most two buffers exist at once: a bucket's views must not be
    kept past the next iteration."""
    plan: Plan = pickle.loads(_recv_bytes(group))

    def post(i: int):
        dtype, pieces = plan[i]
        n = sum(stop - start for _, _, start, stop in pieces)
        flat = torch.empty(n, dtype=getattr(torch, dtype), device=group.device)
        return group.broadcast(flat, wait=False), flat

    def buckets() -> Iterator[list[Piece]]:
        pending = post(0) if plan else None
        for i in range(len(plan)):
            work, flat = pending
            work.wait()
            pending = post(i + 1) if i + 1 < len(plan) else None
            out, offset = [], 0
            for name, _, start, stop in plan[i][1]:
                out.append((name, start, flat[offset : offset + stop - start]))
                offset += stop - start
            del flat
            yield out

    return plan, buckets()


def plan_tensors(plan: Plan) -> list[tuple[str, tuple[int, ...]]]:
    """The (name, shape) of every tensor of a plan, once each, in order."""
    return list({name: shape for _, pieces in plan for name, shape, _, _ in pieces}.items())


def _send_bytes(group: WeightGroup, data: bytes) -> None:
    group.broadcast(torch.tensor([len(data)], dtype=torch.int64, device=group.device))
    group.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8).to(group.device))


def _recv_bytes(group: WeightGroup) -> bytes:
    size = torch.zeros(1, dtype=torch.int64, device=group.device)
    group.broadcast(size)
    data = torch.empty(int(size.item()), dtype=torch.uint8, device=group.device)
    group.broadcast(data)
    return data.cpu().numpy().tobytes()
