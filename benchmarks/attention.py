"""Attention over packed rows: one SDPA call per document (`docs`, the default without
flash-attn) vs one masked SDPA call per row (`dense`, a [T, T] document mask), same model, same
rows, forward + backward, in one process.

Rows of T tokens are packed with documents of long-tailed (lognormal) lengths, as RL trajectories
are; the model is a small random CWM (sliding-window layers included). Dense attention computes
and stores T^2 scores per head whatever the documents; per-document attention only the sum of
their squared lengths.

    python benchmarks/attention.py [--tokens 1024 4096] [--threads 2] [--repeats 3]

Prints a table and a final `RESULT {json}` line (ratio = dense seconds / docs seconds)."""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.cwm import CWM, CWMConfig  # noqa: E402


def packed_positions(tokens: int, median: int, seed: int) -> tuple[torch.Tensor, list[int]]:
    """Position ids of one row filled with documents of lognormal lengths (median `median`)."""
    g = torch.Generator().manual_seed(seed)
    lengths, total = [], 0
    while total < tokens:
        n = int(math.exp(math.log(median) + torch.randn(1, generator=g).item()))
        n = max(1, min(n, tokens - total))
        lengths.append(n)
        total += n
    return torch.cat([torch.arange(n) for n in lengths])[None], lengths


def step_seconds(model: CWM, ids: torch.Tensor, positions: torch.Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # the first warms up
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        hidden = model.hidden_states(ids, positions)
        hidden.float().pow(2).mean().backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--median-doc", type=int, default=160, help="median document length")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = CWMConfig.preset(
        "tiny",
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        sliding_window=512,
    )
    model = CWM(config)
    model.init_weights(std=0.02)
    result: dict = {"benchmark": "attention", "median_doc": args.median_doc}
    ratios = []
    print(
        f"{'tokens':>7} {'docs':>5} {'dense s':>8} {'docs s':>8} {'ratio':>6}  score elems dense/docs"
    )
    for T in args.tokens:
        positions, lengths = packed_positions(T, args.median_doc, seed=T)
        ids = torch.randint(0, config.vocab_size, (1, T))
        seconds = {}
        for backend in ("dense", "docs"):
            model.attn_backend = backend
            seconds[backend] = step_seconds(model, ids, positions, args.repeats)
        ratio = seconds["dense"] / seconds["docs"]
        ratios.append(ratio)
        work = T * T / sum(n * n for n in lengths)
        print(
            f"{T:>7} {len(lengths):>5} {seconds['dense']:>8.3f} {seconds['docs']:>8.3f} "
            f"{ratio:>6.2f}  {work:.1f}x"
        )
        result[f"T{T}"] = {
            "documents": len(lengths),
            "dense_s": round(seconds["dense"], 4),
            "docs_s": round(seconds["docs"], 4),
            "ratio": round(ratio, 2),
        }
    result["geomean_ratio"] = round(math.exp(sum(map(math.log, ratios)) / len(ratios)), 2)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
