"""Continuous batching in the native engine vs batch at a time, on a multi-turn workload with
long-tailed turn lengths, same engine, same requests and seeds, in one process.

`--episodes` episodes run concurrently through rl/rollout.py's Batcher in async mode, as a rollout
worker runs them. Each has `--turns` turns: the prompt is the episode so far (a first prompt of
`--prompt-tokens` random ids, then each turn's completion and an `--obs-tokens` observation), and
each turn's length is drawn from a log-normal distribution (median `--median-tokens`, capped at
`--max-tokens`; no stop tokens, so a turn is exactly that long), with `--env-ms` of environment
time between turns. Batch at a time (`continuous=False`, the engine's behaviour before
continuous batching): requests that arrive while a batch runs wait until its longest row ends.
Continuous: they join the running batch at the next decode step.

    python benchmarks/continuous.py [--threads 2] [--episodes 16] [--turns 3]

Prints per-mode tokens/s and request latency (p50, p95: from a request's submission to its last
token), and a final `RESULT {json}` line (ratios = continuous / batch-at-a-time for tokens/s,
batch-at-a-time / continuous for latency: > 1 means continuous is better)."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.loader import ModelSpec, build_model  # noqa: E402
from rl.engines.base import SamplingParams  # noqa: E402
from rl.engines.native import NativeEngine  # noqa: E402
from rl.rollout import Batcher  # noqa: E402


def workload(args, vocab: int) -> list[list[tuple[list[int], int, list[int]]]]:
    """Per episode, per turn: (first prompt or [], new tokens, observation ids)."""
    rng = random.Random(args.seed)
    episodes = []
    for _ in range(args.episodes):
        turns = []
        for t in range(args.turns):
            first = [rng.randrange(3, vocab) for _ in range(args.prompt_tokens)] if t == 0 else []
            n = int(min(args.max_tokens, max(1, rng.lognormvariate(0, 1.0) * args.median_tokens)))
            obs = [rng.randrange(3, vocab) for _ in range(args.obs_tokens)]
            turns.append((first, n, obs))
        episodes.append(turns)
    return episodes


async def run(engine: NativeEngine, episodes, args, continuous: bool) -> dict:
    batcher = Batcher(engine, args.max_batch, deterministic=False, continuous=continuous)
    batcher.start()
    latencies: list[float] = []
    tokens = 0

    async def episode(e: int, turns) -> None:
        nonlocal tokens
        history: list[int] = []
        for t, (first, n, obs) in enumerate(turns):
            history += first
            params = SamplingParams(max_new_tokens=n, temperature=1.0, seed=e * 100 + t)
            t0 = time.monotonic()
            out, _ = await batcher.generate((e, t), history, params)
            latencies.append(time.monotonic() - t0)
            tokens += len(out.token_ids)
            history += out.token_ids + obs
            await asyncio.sleep(args.env_ms / 1000)

    t0 = time.monotonic()
    await asyncio.gather(*(episode(e, turns) for e, turns in enumerate(episodes)))
    wall = time.monotonic() - t0
    batcher.task.cancel()
    q = statistics.quantiles(latencies, n=20)
    return {
        "tokens_per_s": tokens / wall,
        "p50_s": statistics.median(latencies),
        "p95_s": q[18],
        "wall_s": wall,
        "tokens": tokens,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--episodes", type=int, default=16)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--obs-tokens", type=int, default=16)
    ap.add_argument("--median-tokens", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--env-ms", type=float, default=20.0)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="default", help="model.path (default: SmolLM2-135M)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine = NativeEngine(build_model(ModelSpec(path=args.model)))
    episodes = workload(args, engine.model.config.vocab_size)
    lengths = sorted(n for turns in episodes for _, n, _ in turns)
    print(
        f"{len(lengths)} requests, new tokens: median {statistics.median(lengths)}, "
        f"max {lengths[-1]}, total {sum(lengths)}"
    )
    results: dict[str, list[dict]] = {"batch": [], "continuous": []}
    for _ in range(args.repeats):  # alternate, so drift in the machine's speed hits both
        for mode in ("batch", "continuous"):
            results[mode].append(asyncio.run(run(engine, episodes, args, mode == "continuous")))
    best = {
        mode: {
            "tokens_per_s": max(r["tokens_per_s"] for r in rs),
            "p50_s": min(r["p50_s"] for r in rs),
            "p95_s": min(r["p95_s"] for r in rs),
        }
        for mode, rs in results.items()
    }
    print(f"{'mode':>11} {'tokens/s':>9} {'p50 s':>7} {'p95 s':>7}")
    for mode, b in best.items():
        print(f"{mode:>11} {b['tokens_per_s']:9.1f} {b['p50_s']:7.2f} {b['p95_s']:7.2f}")
    c, b = best["continuous"], best["batch"]
    ratios = {
        "tokens_per_s": round(c["tokens_per_s"] / b["tokens_per_s"], 2),
        "p50_latency": round(b["p50_s"] / c["p50_s"], 2),
        "p95_latency": round(b["p95_s"] / c["p95_s"], 2),
    }
    print(
        "RESULT "
        + json.dumps(
            {
                "benchmark": "continuous",
                "episodes": args.episodes,
                "turns": args.turns,
                "threads": args.threads,
                "best": {m: {k: round(v, 3) for k, v in d.items()} for m, d in best.items()},
                "ratios": ratios,
            }
        )
    )


if __name__ == "__main__":
    main()
