"""Weight sync's memory: the peak extra memory of the sender (the learner) and of a receiver (a
rollout engine) during one collective update, streamed (cast to the rollout dtype at the source,
at most two buckets in flight each side, loaded as they arrive) vs whole (the update before:
sent as trained, every bucket flattened and posted at once, the receiver allocating the whole
update before loading it), on CWM-shaped models of two sizes, gloo on CPU.

Each (mode, size) runs in a fresh pair of processes (rank 0: the learner's side, its fp32 model
and the real `Learner.iter_hf_weights`; rank 1: a NativeEngine holding the model in the rollout
dtype, bf16). Each process resets its peak RSS (`/proc/self/clear_refs`) once its model is
resident and reads `VmHWM` after the update: extra = peak - resident before the update.

    python benchmarks/weight_memory.py [--layers 2 10] [--bucket-mb 32]

Prints a table (extra memory in MiB and in buckets) and a final `RESULT {json}` line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import CWM, CWMConfig  # noqa: E402
from model.hf import to_hf_state_dict  # noqa: E402
from rl.engines.native import NativeEngine  # noqa: E402
from rl.learner import Learner  # noqa: E402
from rl.weights import (  # noqa: E402
    WeightGroup,
    bucket_plan,
    from_arrays,
    merge_buckets,
    plan_tensors,
    recv_weights,
    recv_weights_streaming,
    send_weights,
    send_weights_streaming,
)

ROLLOUT_DTYPE = torch.bfloat16


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> int:
    """Reset VmHWM to the current RSS; returns the current RSS in KiB."""
    Path("/proc/self/clear_refs").write_text("5")
    return rss_kib("VmRSS")


def build(layers: int, dtype: torch.dtype) -> CWM:
    config = CWMConfig.preset("cwm-1b", num_hidden_layers=layers)
    with torch.device("meta"):
        model = CWM(config)
    model = model.to_empty(device="cpu").to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)  # written, so resident before the baseline
    return model


def member(rank: int, mode: str, layers: int, bucket_bytes: int, address: dict, out) -> None:
    torch.set_num_threads(1)
    try:
        if rank == 0:
            model = build(layers, torch.float32)
            learner = SimpleNamespace(model=model, model_config=model.config)
        else:
            engine = NativeEngine(build(layers, ROLLOUT_DTYPE), prepack=False)
        group = WeightGroup.join(address, rank, "gloo", 600)
        base = reset_peak()
        t0 = time.monotonic()
        if rank == 0 and mode == "stream":
            metas = Learner.weight_metas(learner, ROLLOUT_DTYPE)
            tensors = Learner.iter_hf_weights(learner)
            send_weights_streaming(group, bucket_plan(metas, bucket_bytes), tensors)
        elif rank == 0:  # before: the whole HF state dict as trained (fp32), all posted at once
            sd = to_hf_state_dict(dict(model.state_dict()), model.config)
            send_weights(group, sd, bucket_bytes)
        elif mode == "stream":
            plan, buckets = recv_weights_streaming(group)
            engine.load_streaming(plan_tensors(plan), buckets, version=1)
        else:
            engine.update_weights(recv_weights(group), version=1)
        seconds = time.monotonic() - t0
        out.put((rank, (rss_kib("VmHWM") - base) * 1024, seconds))
    except BaseException as e:  # noqa: BLE001 - reported by the parent
        out.put((rank, repr(e), 0.0))


def run(mode: str, layers: int, bucket_bytes: int) -> dict:
    ctx = mp.get_context("spawn")
    store, address = WeightGroup.serve(2, 600)
    out = ctx.Queue()
    procs = [
        ctx.Process(target=member, args=(r, mode, layers, bucket_bytes, address, out))
        for r in (0, 1)
    ]
    for p in procs:
        p.start()
    results = dict((r, (extra, s)) for r, extra, s in (out.get(timeout=1800) for _ in procs))
    for p in procs:
        p.join()
    del store
    for r, (extra, _) in results.items():
        if isinstance(extra, str):
            raise RuntimeError(f"{mode} rank {r}: {extra}")
    return {
        "sender_extra": results[0][0],
        "receiver_extra": results[1][0],
        "seconds": max(results[0][1], results[1][1]),
    }


class _Publisher:
    """The learner's object-store side (the real `Learner.publish_weights`) on a plain model."""

    streams_weights, rank, step = True, 0, 0
    iter_hf_weights = Learner.iter_hf_weights
    publish_weights = Learner.publish_weights

    def __init__(self, layers: int):
        self.model = build(layers, torch.float32)
        self.model_config = self.model.config


class _Fetcher:
    """A rollout worker's object-store side: fetch every bucket, then load the update at once."""

    def __init__(self, layers: int):
        self.engine = NativeEngine(build(layers, ROLLOUT_DTYPE), prepack=False)

    def receive(self, refs: list) -> int:
        import ray

        arrays = ray.get(refs)
        self.engine.update_weights(merge_buckets([from_arrays(a) for a in arrays]), version=1)
        return self.engine.version


def sync_object_store(layers: int, bucket_bytes: int) -> float:
    """Seconds of one object-store update (publish, fetch, load) between two Ray actors."""
    import ray

    from rl.orchestrator import init_ray

    if not ray.is_initialized():
        init_ray(num_cpus=2)
    publisher = ray.remote(num_cpus=0)(_Publisher).remote(layers)
    fetcher = ray.remote(num_cpus=0)(_Fetcher).remote(layers)
    try:
        ray.get([publisher.__ray_ready__.remote(), fetcher.__ray_ready__.remote()])
        t0 = time.monotonic()
        _, refs = ray.get(publisher.publish_weights.remote(bucket_bytes, "bfloat16"))
        assert ray.get(fetcher.receive.remote(refs)) == 1
        return time.monotonic() - t0
    finally:
        ray.kill(publisher)
        ray.kill(fetcher)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 10])
    ap.add_argument("--bucket-mb", type=float, default=32.0)
    ap.add_argument("--modes", nargs="+", default=["stream", "whole"])
    args = ap.parse_args()
    bucket = int(args.bucket_mb * 2**20)
    rows = []
    print(
        f"{'params':>7} {'mode':>7} {'model MiB':>10} {'sender MiB':>11} {'(buckets)':>10} "
        f"{'receiver MiB':>13} {'(buckets)':>10} {'s':>6}"
    )
    for layers in args.layers:
        config = CWMConfig.preset("cwm-1b", num_hidden_layers=layers)
        n = config.num_params
        model_mib = n * ROLLOUT_DTYPE.itemsize / 2**20
        for mode in args.modes:
            r = run(mode, layers, bucket)
            row = {
                "params_b": round(n / 1e9, 2),
                "mode": mode,
                "update_mib": round(model_mib),
                "sender_extra_mib": round(r["sender_extra"] / 2**20),
                "sender_buckets": round(r["sender_extra"] / bucket, 2),
                "receiver_extra_mib": round(r["receiver_extra"] / 2**20),
                "receiver_buckets": round(r["receiver_extra"] / bucket, 2),
                "seconds": round(r["seconds"], 2),
            }
            rows.append(row)
            print(
                f"{row['params_b']:6.2f}B {mode:>7} {row['update_mib']:10d} "
                f"{row['sender_extra_mib']:11d} {row['sender_buckets']:10.2f} "
                f"{row['receiver_extra_mib']:13d} {row['receiver_buckets']:10.2f} "
                f"{row['seconds']:6.2f}",
                flush=True,
            )
    print(
        "RESULT "
        + json.dumps(
            {
                "benchmark": "weight_memory",
                "bucket_mb": args.bucket_mb,
                "rollout_dtype": "bfloat16",
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
