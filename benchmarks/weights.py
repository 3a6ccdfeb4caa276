"""Weight sync, learner -> rollout workers: Ray's object store vs a collective broadcast (gloo on
CPU), through the real actors of a run, in one process.

One Learner actor and N RolloutWorker actors of a run on the default model (SmolLM2-135M, fp32:
540 MB of weights); `Orchestrator.sync_weights` with each method in turn, repeated, alternating.
A sync here is the whole update, as in sync mode: the learner gathers its HF-named weights,
every worker receives all of them and applies them between two decode steps (its engine idle).

    python benchmarks/weights.py [--workers 2] [--repeats 5] [--bucket-mb 64]

Prints a table and a final `RESULT {json}` line (ratio = object store seconds / collective)."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402

from rl.config import load_config  # noqa: E402
from rl.orchestrator import Orchestrator, init_ray  # noqa: E402

METHODS = ("object_store", "collective")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--bucket-mb", type=float, default=64.0)
    ap.add_argument("--model", default="default", help="model.path (default: SmolLM2-135M)")
    args = ap.parse_args()
    init_ray(num_cpus=args.workers + 2)
    overrides = [
        f"model.path={args.model}",
        f"rollout.num_workers={args.workers}",
        f"weight_sync.bucket_mb={args.bucket_mb}",
        "envs.reverse.config.n_train=8",
        "progress=false",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        orch = Orchestrator(load_config(None, overrides), Path(tmp) / "bench")
        orch.start()
        try:
            times: dict[str, list[float]] = {m: [] for m in METHODS}
            version = 0
            for rep in range(args.repeats + 1):  # the first round warms both paths up
                for method in METHODS:
                    orch.cfg.weight_sync.method = method
                    version += 1
                    t0 = time.monotonic()
                    orch.sync_weights(version)
                    if rep:
                        times[method].append(time.monotonic() - t0)
            got = ray.get([w.version.remote() for w in orch.workers])
            assert got == [version] * args.workers, got  # every update arrived
        finally:
            orch.stop()
    med = {m: statistics.median(t) for m, t in times.items()}
    print(f"{'method':<13} {'median s':>9} {'min s':>7} {'max s':>7}   ({args.workers} workers)")
    for m in METHODS:
        print(f"{m:<13} {med[m]:>9.3f} {min(times[m]):>7.3f} {max(times[m]):>7.3f}")
    result = {
        "benchmark": "weights",
        "model": args.model,
        "workers": args.workers,
        "bucket_mb": args.bucket_mb,
        "object_store_s": round(med["object_store"], 3),
        "collective_gloo_s": round(med["collective"], 3),
        "ratio_object_store_vs_collective": round(med["object_store"] / med["collective"], 2),
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
