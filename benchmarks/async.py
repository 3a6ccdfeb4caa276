"""Seconds per RL step in sync mode vs async mode (max_lag 2) on one workload with long-tailed
environment latency, in one process; also weight-sync time as a share of step time.

    python benchmarks/async.py [--steps 8] [--latency 0.4] [--sigma 1.0] [--weight-sync collective]

The workload: a small random CWM on the `reverse` env whose scoring sleeps a lognormal time per
episode (median --latency s, log-sd --sigma: a few episodes take many times the median, as
sandboxed test runs do). Sync mode waits for the slowest episode of every step, then trains; async
mode keeps generating while the learner trains. Prints a table and a final `RESULT {json}` line."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rl.config import load_config  # noqa: E402
from rl.orchestrator import Orchestrator, init_ray  # noqa: E402


def workload(steps: int, latency: float, sigma: float) -> list[str]:
    return [
        "model.path=preset:tiny",
        "model.tokenizer=default",
        "model.overrides={hidden_size: 256, intermediate_size: 768, num_hidden_layers: 4, "
        "num_attention_heads: 8, num_key_value_heads: 2, head_dim: 32}",
        "envs.reverse.config.n_train=256",
        f"envs.reverse.config.latency_s={latency}",
        f"envs.reverse.config.latency_sigma={sigma}",
        f"steps={steps}",
        "groups_per_step=4",
        "group_size=4",
        "rollout.max_new_tokens=16",
        "rollout.max_context=128",
        "learner.micro_batch_tokens=1024",
        "learner.optim.lr=1e-4",
        "eval.num_tasks=1",
        "checkpoint.export_hf=false",
        "progress=false",
    ]


def measure(mode: str, args, tmp: Path) -> dict:
    extra = ["mode=sync"] if mode == "sync" else ["mode=async", f"max_lag={args.max_lag}"]
    extra.append(f"weight_sync.method={args.weight_sync}")
    cfg = load_config(
        None, workload(args.steps, args.latency, args.sigma) + extra + [f"name={mode}"]
    )
    Orchestrator(cfg, tmp / mode).run()
    rows = [json.loads(x) for x in (tmp / mode / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "time/step_s" in r][1:]  # the first step includes warm-up
    return {
        "s_per_step": statistics.mean(r["time/step_s"] for r in steps),
        "sync_share": statistics.mean(r["time/weight_sync_share"] for r in steps),
        "sync_s": statistics.mean(r["time/weight_sync_s"] for r in steps),
        "max_lag_seen": max(r.get("staleness/max_token_lag", 0) for r in steps),
        "reward_last": steps[-1].get("reward/mean"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--latency", type=float, default=0.4)
    ap.add_argument("--sigma", type=float, default=1.0)
    ap.add_argument("--max-lag", type=int, default=2)
    ap.add_argument("--weight-sync", default="object_store", choices=["object_store", "collective"])
    args = ap.parse_args()
    init_ray(num_cpus=2)
    with tempfile.TemporaryDirectory() as tmp:
        res = {mode: measure(mode, args, Path(tmp)) for mode in ("sync", "async")}
    print(f"{'mode':<6} {'s/step':>8} {'sync s':>8} {'sync share':>11} {'max lag':>8}")
    for mode, r in res.items():
        print(
            f"{mode:<6} {r['s_per_step']:>8.2f} {r['sync_s']:>8.3f} {r['sync_share']:>11.1%} "
            f"{r['max_lag_seen']:>8}"
        )
    ratio = res["sync"]["s_per_step"] / res["async"]["s_per_step"]
    result = {
        "benchmark": "async",
        "sync_s_per_step": round(res["sync"]["s_per_step"], 3),
        "async_s_per_step": round(res["async"]["s_per_step"], 3),
        "speedup_async_vs_sync": round(ratio, 2),
        "weight_sync_share_sync": round(res["sync"]["sync_share"], 4),
        "weight_sync_share_async": round(res["async"]["sync_share"], 4),
        "max_lag": args.max_lag,
        "weight_sync": args.weight_sync,
        "max_lag_seen": res["async"]["max_lag_seen"],
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
