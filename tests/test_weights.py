"""Weight sync transports (rl/weights.py): buckets, and a real gloo group of one source and
several receivers (threads of this process, each its own rank over TCP) moving a state dict bit
for bit. The NCCL backend is the same code on CUDA tensors; it needs GPUs and is not run here."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from model.hf import split_state_dict
from rl.weights import (
    WeightGroup,
    WeightSyncConfig,
    bucket_plan,
    flatten,
    from_arrays,
    merge_buckets,
    plan_tensors,
    recv_weights,
    recv_weights_streaming,
    resolve_backend,
    send_weights,
    send_weights_streaming,
    to_arrays,
    unflatten,
)


def mixed_state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(50, 8, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=g),
        "model.layers.0.input_layernorm.weight": torch.randn(8, generator=g).bfloat16(),
        "model.layers.0.mlp.up_proj.weight": torch.randn(16, 8, generator=g).bfloat16(),
        "model.rotary.inv_freq": torch.arange(4, dtype=torch.int64),
        "lm_head.weight": torch.randn(50, 8, generator=g),
    }


def test_buckets_keep_order_respect_size_and_hold_one_dtype():
    sd = mixed_state_dict()
    buckets = split_state_dict(sd, bucket_bytes := 1024, by_dtype=True)
    assert [k for b in buckets for k in b] == list(sd)  # every tensor once, in order
    for b in buckets:
        assert len({t.dtype for t in b.values()}) == 1
        nbytes = sum(t.numel() * t.element_size() for t in b.values())
        assert nbytes <= bucket_bytes or len(b) == 1  # a larger tensor goes alone
    # embed (1600 B) alone; q_proj (256 B) fp32; then the bf16 pair; int64; lm_head alone
    assert [len(b) for b in buckets] == [1, 1, 2, 1, 1]
    # without by_dtype, q_proj and the bf16 tensors would share a bucket
    assert len(split_state_dict(sd, 1024)) < len(buckets)


def test_flatten_then_unflatten_is_the_identity():
    sd = {k: v for k, v in mixed_state_dict().items() if v.dtype == torch.float32}
    flat = flatten(sd)
    assert flat.shape == (sum(v.numel() for v in sd.values()),)
    back = unflatten(flat, [(k, tuple(v.shape)) for k, v in sd.items()])
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    with pytest.raises(ValueError, match="plan"):
        unflatten(flat[:-1], [(k, tuple(v.shape)) for k, v in sd.items()])


def test_merge_buckets_rebuilds_one_update_and_refuses_a_mixed_one():
    sd = mixed_state_dict()
    buckets = split_state_dict(sd, 1024, by_dtype=True)
    merged = merge_buckets(buckets)
    assert list(merged) == list(sd) and all(merged[k] is sd[k] for k in sd)
    with pytest.raises(ValueError, match="'lm_head.weight' appears twice"):
        merge_buckets([*buckets, {"lm_head.weight": sd["lm_head.weight"] + 1}])
    assert merge_buckets([]) == {}


def test_object_store_buckets_round_trip_bit_for_bit_bf16_included(ray_local):
    sd = mixed_state_dict()
    got = from_arrays(ray_local.get(ray_local.put(to_arrays(sd))))
    assert list(got) == list(sd)
    for k, v in sd.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def run_group(world_size: int, root_work, receiver_work, timeout_s: float = 30.0) -> list:
    """Rank 0 runs root_work(group), ranks 1.. receiver_work(group); each in its own thread.
    Returns their results by rank (an exception where one raised)."""
    store, address = WeightGroup.serve(world_size, timeout_s)
    results: list = [None] * world_size

    def member(rank: int) -> None:
        try:
            group = WeightGroup.join(
                address, rank, "gloo", timeout_s, store=store if rank == 0 else None
            )
            results[rank] = (root_work if rank == 0 else receiver_work)(group)
        except Exception as e:  # noqa: BLE001 - returned to the test
            results[rank] = e

    threads = [threading.Thread(target=member, args=(r,), daemon=True) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s + 30)
    return results


def test_a_gloo_broadcast_moves_a_mixed_state_dict_bit_for_bit():
    sd = mixed_state_dict()
    results = run_group(
        4, lambda g: send_weights(g, sd, bucket_bytes=1024), lambda g: recv_weights(g)
    )
    assert results[0] == sum(t.numel() * t.element_size() for t in sd.values())
    for got in results[1:]:
        assert list(got) == list(sd)
        for k, v in sd.items():
            assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def test_two_updates_in_a_row_arrive_in_order():
    first, second = mixed_state_dict(), {k: v + 1 for k, v in mixed_state_dict().items()}

    def root(g):
        send_weights(g, first, 4096)
        send_weights(g, second, 4096)

    results = run_group(3, root, lambda g: (recv_weights(g), recv_weights(g)))
    for a, b in results[1:]:
        assert all(torch.equal(a[k], first[k]) and torch.equal(b[k], second[k]) for k in first)


def test_a_source_that_closes_its_group_frees_a_receiver_stuck_on_it():
    """A broadcast that fails (a receiver died) must not hold the other receivers until the
    timeout: the source closes its group, and every receive blocked on it fails at once."""
    store, address = WeightGroup.serve(2, 60.0)
    groups: dict = {}
    outcome: dict = {}

    def root():
        groups[0] = WeightGroup.join(address, 0, "gloo", 60.0, store=store)

    def receiver():
        groups[1] = WeightGroup.join(address, 1, "gloo", 60.0)
        t0 = time.monotonic()
        try:
            recv_weights(groups[1])
        except Exception as e:  # noqa: BLE001
            outcome["error"] = e
        outcome["waited"] = time.monotonic() - t0

    threads = [threading.Thread(target=f, daemon=True) for f in (root, receiver)]
    for t in threads:
        t.start()
    threads[0].join(30)
    time.sleep(0.5)  # the receiver is now blocked in its first broadcast
    assert "waited" not in outcome
    groups[0].close()
    threads[1].join(30)
    assert "error" in outcome and outcome["waited"] < 30  # not the 60 s timeout


def test_config_and_backend_choice():
    assert resolve_backend("auto", 0, 0) == "gloo"
    assert resolve_backend("auto", 1, 0) == "gloo"  # workers on CPU: NCCL cannot reach them
    assert resolve_backend("auto", 1, 1) == "nccl"
    assert resolve_backend("gloo", 1, 1) == "gloo"
    assert WeightSyncConfig(bucket_mb=0.5).bucket_bytes == 2**19
    with pytest.raises(ValueError, match="weight_sync.method"):
        WeightSyncConfig(method="rdma")
    with pytest.raises(ValueError, match="weight_sync.backend"):
        WeightSyncConfig(backend="mpi")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="nccl needs CUDA"):
            WeightGroup.join({"host": "127.0.0.1", "port": 1, "world_size": 2}, 1, "nccl", 1.0)


# -- streaming: the plan from metadata, at most two buckets held --------------------------------


def test_the_plan_covers_every_tensor_once_in_buckets_no_larger_than_asked():
    """A tensor larger than a bucket is split across buckets (CWM's embedding is far larger
    than any reasonable bucket); every element belongs to exactly one piece, in order, and a
    bucket holds one dtype and at most bucket_bytes, whatever the largest tensor."""
    sd = mixed_state_dict()
    metas = [(k, tuple(v.shape), v.dtype) for k, v in sd.items()]
    for bucket_bytes in (1, 100, 1024, 10**9):
        plan = bucket_plan(metas, bucket_bytes)
        covered: dict[str, list[tuple[int, int]]] = {}
        for dtype, pieces in plan:
            size = sum(stop - start for _, _, start, stop in pieces)
            assert size * getattr(torch, dtype).itemsize <= max(bucket_bytes, 8)
            for name, shape, start, stop in pieces:
                assert shape == tuple(sd[name].shape) and str(sd[name].dtype) == f"torch.{dtype}"
                covered.setdefault(name, []).append((start, stop))
        assert list(covered) == list(sd)
        for name, ranges in covered.items():
            assert ranges[0][0] == 0 and ranges[-1][1] == sd[name].numel()
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert len(bucket_plan(metas, 10**9)) == 4  # one bucket per dtype run: f32, bf16, i64, f32
    plan = bucket_plan([("big", (100, 10), torch.float32)], 1000)
    assert [p for _, ps in plan for p in ps][:2] == [
        ("big", (100, 10), 0, 250),
        ("big", (100, 10), 250, 500),
    ]


def whole_tensors(plan, pieces) -> dict[str, torch.Tensor]:
    """A streamed update's pieces put together: each tensor in the plan's dtype and shape."""
    dtypes = {name: dtype for dtype, ps in plan for name, *_ in ps}
    out = {
        name: torch.empty(shape, dtype=getattr(torch, dtypes[name]))
        for name, shape in plan_tensors(plan)
    }
    for name, start, values in pieces:
        out[name].view(-1)[start : start + values.numel()].copy_(values)
    return out


def test_a_streamed_update_arrives_bit_for_bit_holding_two_buffers_at_most():
    """The sender takes its tensors one at a time from an iterator; every receiver gets them
    bucket by bucket, and when it holds bucket i no buffer of bucket i-2 or older is alive (it
    keeps no reference: at most the one it reads and the one being received)."""
    import gc
    import weakref

    sd = mixed_state_dict()
    metas = [(k, tuple(v.shape), v.dtype) for k, v in sd.items()]
    plan = bucket_plan(metas, 256)  # the embedding (1600 bytes) spans buckets
    assert len(plan) >= 8
    pulled = []

    def tensors():
        for k, v in sd.items():
            pulled.append(k)
            yield k, v

    def receive(g):
        got_plan, buckets = recv_weights_streaming(g)
        pieces, buffers, alive = [], [], []
        for bucket in buckets:
            pieces += [(name, start, values.clone()) for name, start, values in bucket]
            buffers.append(weakref.ref(bucket[0][2]._base))
            del bucket
            gc.collect()
            alive.append(sum(ref() is not None for ref in buffers))
        return got_plan, whole_tensors(got_plan, pieces), alive

    results = run_group(3, lambda g: send_weights_streaming(g, plan, tensors()), receive)
    assert results[0] == sum(t.numel() * t.element_size() for t in sd.values())
    assert pulled == list(sd)
    for got_plan, out, alive in results[1:]:
        assert got_plan == plan
        assert list(out) == list(sd)
        for k in sd:
            assert out[k].dtype == sd[k].dtype and torch.equal(out[k], sd[k])
        assert max(alive) <= 2, alive


def test_a_stream_whose_tensors_do_not_follow_the_plan_is_refused():
    sd = mixed_state_dict()
    plan = bucket_plan([(k, tuple(v.shape), v.dtype) for k, v in sd.items()], 10**9)
    swapped = list(sd.items())
    swapped[0], swapped[1] = swapped[1], swapped[0]
    group_results = run_group(
        2,
        lambda g: send_weights_streaming(g, plan, iter(swapped)),
        lambda g: recv_weights_streaming(g)[0],
        timeout_s=5,
    )
    assert isinstance(group_results[0], RuntimeError)
    assert "weight stream: expected" in str(group_results[0])


def test_the_weight_group_store_listens_on_the_node_address_alone():
    """Left to bind its own socket, a TCPStore listens on every interface: serve hands it one
    bound to the node's address (loopback without Ray)."""
    import psutil  # installed with ray[default]

    store, address = WeightGroup.serve(2, 10.0)
    listening = [
        c.laddr.ip
        for c in psutil.Process().net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == address["port"]
    ]
    assert listening == [address["host"]]
    del store
