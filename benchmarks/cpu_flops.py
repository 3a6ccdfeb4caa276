"""How far the demo is from this CPU's limit: the peak fp32 matmul FLOP/s of the machine, then the
FLOP/s that the demo's two phases achieve, as fractions of it (the CPU counterpart of MFU).

- peak: the best of square fp32 `torch.mm` at a few sizes with the demo's threads (2).
- generation: the demo's rollout shape through the native engine (SmolLM2-135M, fp32, prepacked
  linears): `--groups` prompts of about the demo's prompt length, G samples each, `--new-tokens`
  sampled tokens, no stop. Useful FLOPs: 2 * matmul params per token (prefill and decode) plus
  attention (4 * layers * hidden * context per token).
- training: `Learner.train_step` on a batch of the demo's shape (groups * G sequences of prompt +
  completion, packed in `--micro-batch-tokens` rows). Useful FLOPs: 3x the forward's (forward and
  backward), counted on every token of the rows.

Matmul params: every linear weight, lm_head included, the input embedding (a lookup) excluded.

    python benchmarks/cpu_flops.py [--threads 2]

Prints a table and a final `RESULT {json}` line (fractions = achieved / peak fp32)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.learner import synthetic_batch  # noqa: E402
from model.loader import ModelSpec, build_model  # noqa: E402
from rl import grpo  # noqa: E402
from rl.engines.base import SamplingParams  # noqa: E402
from rl.engines.native import NativeEngine  # noqa: E402
from rl.learner import Learner, LearnerConfig, OptimConfig  # noqa: E402


def peak_matmul(dtype: torch.dtype, sizes=(1024, 2048, 3072), repeats: int = 5) -> float:
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        torch.mm(a, b)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def matmul_params(config) -> int:
    embed = config.vocab_size * config.hidden_size
    return config.num_params - embed if not config.tie_word_embeddings else config.num_params


def forward_flops(config, context: int) -> float:
    """Useful FLOPs of one token's forward at `context` tokens of attention."""
    attention = 4 * config.num_hidden_layers * config.num_attention_heads * config.head_dim
    return 2 * matmul_params(config) + attention * context


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=60)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--micro-batch-tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--model", default="default")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    peak = peak_matmul(torch.float32)
    print(f"peak fp32 matmul, {args.threads} threads: {peak / 1e9:.1f} GFLOP/s", flush=True)

    # generation, the demo's rollout shape
    spec = ModelSpec(path=args.model)
    engine = NativeEngine(build_model(spec))
    config = engine.model.config
    g = torch.Generator().manual_seed(0)
    prompts, params = [], []
    for k in range(args.groups):
        prompt = torch.randint(3, config.vocab_size, (args.prompt_tokens,), generator=g).tolist()
        for i in range(args.group_size):
            prompts.append(prompt)
            params.append(SamplingParams(max_new_tokens=args.new_tokens, seed=k * 100 + i))
    engine.generate(prompts[:2], params[:2])  # warm-up
    gen_s = float("inf")
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        engine.generate(prompts, params)
        gen_s = min(gen_s, time.perf_counter() - t0)
    P, N = args.prompt_tokens, args.new_tokens
    # each distinct prompt is prefilled once; every row decodes N tokens
    prefill = args.groups * sum(forward_flops(config, c) for c in range(1, P + 1))
    decode = len(prompts) * sum(forward_flops(config, P + c) for c in range(1, N + 1))
    gen_flops = (prefill + decode) / gen_s
    engine.close()
    del engine

    # training, the demo's batch shape
    learner = Learner(
        LearnerConfig(
            optim=OptimConfig(lr=1e-5),
            loss=grpo.LossConfig(aggregation="token-mean"),
            micro_batch_tokens=args.micro_batch_tokens,
        ),
        spec,
        num_threads=args.threads,
    )
    lengths = [P + N] * len(prompts)
    batch = synthetic_batch(lengths, config.vocab_size)
    learner.train_step(batch)  # warm-up
    train_s = float("inf")
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        learner.train_step(batch)
        train_s = min(train_s, time.perf_counter() - t0)
    # every token of every row goes forward and backward; attention within its own sequence
    train_flops = 3 * sum(sum(forward_flops(config, c) for c in range(1, n + 1)) for n in lengths)
    train_flops /= train_s

    rows = {
        "generation": (gen_flops, gen_s),
        "training": (train_flops, train_s),
    }
    print(f"{'phase':>11} {'GFLOP/s':>9} {'of fp32 peak':>13} {'s':>7}")
    for name, (flops, s) in rows.items():
        print(f"{name:>11} {flops / 1e9:9.1f} {flops / peak:13.3f} {s:7.2f}")
    print(
        "RESULT "
        + json.dumps(
            {
                "benchmark": "cpu_flops",
                "threads": args.threads,
                "peak_fp32_gflops": round(peak / 1e9, 1),
                "generation_gflops": round(gen_flops / 1e9, 2),
                "training_gflops": round(train_flops / 1e9, 2),
                "fractions": {
                    "generation": round(gen_flops / peak, 3),
                    "training": round(train_flops / peak, 3),
                },
            }
        )
    )


if __name__ == "__main__":
    main()
