"""GRPO groups in the native engine: each distinct prompt prefilled once and its KV cache copied
to the G rows sampling it (`share_prompts`, the default) vs every row prefilled on its own, same
model, prompts and seeds, in one process.

A batch is `--groups` prompts of `--prompt-tokens` tokens (random ids), each asked for G sampled
completions of `--new-tokens` tokens, as a rollout worker sends them in sync mode. Long prompts
(SWE and code tasks) make the prefill most of the work.

    python benchmarks/prefix.py [--threads 2] [--group-size 8] [--prompt-tokens 64 512]

Prints a table and a final `RESULT {json}` line (ratio = shared tokens/s / unshared)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.generate import timed  # noqa: E402
from model.loader import ModelSpec, build_model  # noqa: E402
from rl.engines.base import SamplingParams  # noqa: E402
from rl.engines.native import NativeEngine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--groups", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--model", default="default", help="model.path (default: SmolLM2-135M)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine = NativeEngine(build_model(ModelSpec(path=args.model)))
    vocab = engine.model.config.vocab_size
    result: dict = {"benchmark": "prefix", "group_size": args.group_size, "groups": args.groups}
    ratios = []
    print(f"{'prompt':>7} {'shared tok/s':>13} {'unshared tok/s':>15} {'ratio':>6}")
    for n in args.prompt_tokens:
        g = torch.Generator().manual_seed(n)
        prompts, params = [], []
        for k in range(args.groups):
            prompt = torch.randint(3, vocab, (n,), generator=g).tolist()
            for i in range(args.group_size):
                prompts.append(prompt)
                params.append(
                    SamplingParams(
                        max_new_tokens=args.new_tokens,
                        temperature=1.0,
                        seed=k * 1000 + i,
                        stop_token_ids=(),
                    )
                )

        def run(prompts=prompts, params=params) -> int:
            return sum(len(c.token_ids) for c in engine.generate(prompts, params))

        speed = {}
        for share in (True, False):
            engine.share_prompts = share
            speed[share] = timed(run, args.repeats)
        ratio = speed[True] / speed[False]
        ratios.append(ratio)
        print(f"{n:>7} {speed[True]:>13.1f} {speed[False]:>15.1f} {ratio:>6.2f}")
        result[f"prompt{n}"] = {
            "shared_tok_s": round(speed[True], 1),
            "unshared_tok_s": round(speed[False], 1),
            "ratio": round(ratio, 2),
        }
    result["geomean_ratio"] = round(math.exp(sum(map(math.log, ratios)) / len(ratios)), 2)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
