"""Cost as work grows, three curves, each printed and drawn as a PNG (in `--out`):

- learner.png: learner tokens/s (forward + backward of the learner's log-prob path, the GRPO
  loss) vs the length of one sequence (1k to 16k tokens), on one rank with all threads and with
  context parallelism over 2 gloo ranks (one thread each: the same cores), a small CWM-shaped
  model with the 3:1 sliding/global pattern;
- engine.png: native engine decode tokens/s vs batch size (continuous batching engine, sampled,
  no stop);
- weight_sync.png: seconds of one weight update vs model size (CWM-shaped, fp32 learner, bf16
  rollout engine), for both transports: `collective` (gloo broadcast, streamed: at most two
  buckets in flight) and `object_store` (Ray's shared-memory store: every bucket put, then the
  receiver fetches them all and loads them at once).

    python benchmarks/scaling.py [--parts learner engine sync] [--out benchmarks/out]

Prints each curve and a final `RESULT {json}` line."""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import CWM, CWMConfig  # noqa: E402
from rl import grpo  # noqa: E402
from rl.engines.base import SamplingParams  # noqa: E402
from rl.engines.native import NativeEngine  # noqa: E402
from rl.learner import context_parallel_logprobs, token_logprobs  # noqa: E402
from rl.packing import build_micro_batch  # noqa: E402
from rl.runlog import plot_lines  # noqa: E402

LOSS = grpo.LossConfig(aggregation="token-mean")


def learner_config() -> CWMConfig:
    return CWMConfig.preset(
        "tiny",
        vocab_size=8192,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        sliding_window=1024,
        max_position_embeddings=32768,
    )


def one_sequence(length: int, vocab: int):
    """A micro-batch of one sequence of `length` tokens (the first 1/8 prompt)."""
    g = torch.Generator().manual_seed(length)
    tokens = [torch.randint(3, vocab, (length,), generator=g).tolist()]
    mask = [[0] * (length // 8) + [1] * (length - length // 8)]
    mb = build_micro_batch([0], tokens, mask, mask, [[1.0] * length])
    mb.behaviour_logprobs = torch.full((1, length), -5.0)
    return mb


def learner_step_s(model: CWM, mb, group, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        if group is None:
            lp, _ = token_logprobs(model, mb, 1.0, 1024)
        else:
            window = model.config.sliding_window
            lp, _ = context_parallel_logprobs(model, mb, group, window, 1.0, 1024)
        loss, _ = grpo.packed_policy_loss(lp, mb, LOSS, normaliser=None)
        model.zero_grad(set_to_none=True)
        loss.backward()
        if group is not None:
            dist.barrier(group)
        best = min(best, time.perf_counter() - t0)
    return best


def _cp_rank(rank: int, world: int, init: str, lengths: list[int], repeats: int, out: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    model = CWM(learner_config())
    model.init_weights()
    times = {n: learner_step_s(model, one_sequence(n, 8192), dist.group.WORLD, repeats)
             for n in lengths}  # fmt: skip
    if rank == 0:
        Path(out).write_text(json.dumps(times))
    dist.destroy_process_group()


def learner_curve(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = CWM(learner_config())
    model.init_weights()
    single = {n: n / learner_step_s(model, one_sequence(n, 8192), None, args.repeats)
              for n in args.lengths}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        init = f"tcp://127.0.0.1:{s.getsockname()[1]}"
        s.close()
        out = f"{tmp}/cp.json"
        mp.spawn(_cp_rank, args=(2, init, args.lengths, args.repeats, out), nprocs=2)
        cp = {int(n): int(n) / t for n, t in json.loads(Path(out).read_text()).items()}
    print(f"{'tokens':>7} {'1 rank tok/s':>13} {'CP=2 tok/s':>11}")
    for n in args.lengths:
        print(f"{n:7d} {single[n]:13.1f} {cp[n]:11.1f}")
    plot_lines(
        Path(args.out) / "learner.png",
        [
            {
                "x": args.lengths,
                "y": [single[n] for n in args.lengths],
                "fmt": "o-",
                "label": "1 rank, 2 threads",
            },
            {
                "x": args.lengths,
                "y": [cp[n] for n in args.lengths],
                "fmt": "s-",
                "label": "context parallel, 2 ranks x 1 thread",
            },
        ],  # fmt: skip
        title="learner: forward + backward of one sequence",
        ylabel="tokens/s",
        xlabel="sequence length (tokens)",
    )
    return {"single_tokens_per_s": single, "cp2_tokens_per_s": cp}


def engine_curve(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = CWM(CWMConfig.preset("tiny", **{k: v for k, v in learner_config().to_dict().items()
                                            if k in ("vocab_size", "hidden_size",
                                                     "intermediate_size", "num_hidden_layers",
                                                     "num_attention_heads", "num_key_value_heads",
                                                     "head_dim")}))  # fmt: skip
    model.init_weights()
    engine = NativeEngine(model.eval())
    vocab = model.config.vocab_size
    tokens_per_s = {}
    for batch in args.batches:
        g = torch.Generator().manual_seed(batch)
        prompts = [torch.randint(3, vocab, (64,), generator=g).tolist() for _ in range(batch)]
        params = [SamplingParams(max_new_tokens=args.new_tokens, seed=i) for i in range(batch)]
        engine.generate(prompts[:1], params[:1])
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            engine.generate(prompts, params)
            best = min(best, time.perf_counter() - t0)
        tokens_per_s[batch] = batch * args.new_tokens / best
        print(f"engine batch {batch:4d}: {tokens_per_s[batch]:9.1f} tokens/s", flush=True)
    engine.close()
    plot_lines(
        Path(args.out) / "engine.png",
        [{"x": args.batches, "y": [tokens_per_s[b] for b in args.batches], "fmt": "o-"}],
        title="native engine decode",
        ylabel="tokens/s",
        xlabel="batch size",
    )
    return {"tokens_per_s": tokens_per_s}


def sync_curve(args) -> dict:
    from benchmarks.weight_memory import run as collective_run
    from benchmarks.weight_memory import sync_object_store

    sizes, curves = [], {"collective": [], "object_store": []}
    for layers in args.sync_layers:
        n = CWMConfig.preset("cwm-1b", num_hidden_layers=layers).num_params
        sizes.append(round(n / 1e9, 3))
        c = collective_run("stream", layers, int(args.bucket_mb * 2**20))["seconds"]
        o = sync_object_store(layers, int(args.bucket_mb * 2**20))
        curves["collective"].append(c)
        curves["object_store"].append(o)
        print(f"weight sync {sizes[-1]:.2f}B: collective {c:.2f} s, object store {o:.2f} s",
              flush=True)  # fmt: skip
    plot_lines(
        Path(args.out) / "weight_sync.png",
        [{"x": sizes, "y": v, "fmt": "o-", "label": k} for k, v in curves.items()],
        title="weight sync, one update (fp32 learner -> bf16 engine)",
        ylabel="seconds",
        xlabel="parameters (billions)",
    )
    return {"params_b": sizes, "seconds": curves}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", default=["learner", "engine", "sync"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--sync-layers", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--bucket-mb", type=float, default=32.0)
    ap.add_argument("--out", default="benchmarks/out")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    result = {"benchmark": "scaling", "threads": args.threads}
    for part, fn in (("learner", learner_curve), ("engine", engine_curve), ("sync", sync_curve)):
        if part in args.parts:
            result[part] = fn(args)
    print(f"curves drawn in {args.out}/")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
