"""Learner step throughput: packed micro-batches vs padded batches, same model, same sequences.

A step is forward + backward + AdamW over one batch of sequences whose lengths follow a long-tailed
(lognormal) mix, as RL rollouts do. Packed: `Learner.train_step` as is (trajectories packed into
token-budget rows, positions restarting per trajectory). Padded: the same sequences in [B, Lmax]
batches in arrival order (plain position ids, pads masked out of the loss), through the same model,
loss (`grpo.policy_loss`), optimizer step and schedule. Only real tokens count for tokens/s.

On a GPU an extra mode measures MFU of a ~1B CWM (preset cwm-1b) on packed 8k-token micro-batches
under bf16 autocast: MFU = 6 * params * tokens/s / peak bf16 FLOP/s of the GPU (params: the matmul
weights, all but the input embedding; activation recompute and attention scores not counted).

    python benchmarks/learner.py [--threads 2] [--sequences 32] [--hidden 256] [--sorted-padded]

Prints a table and a final `RESULT {json}` line."""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.loader import ModelSpec  # noqa: E402
from rl import grpo  # noqa: E402
from rl.learner import Learner, LearnerConfig, OptimConfig  # noqa: E402
from rl.packing import pack  # noqa: E402
from rl.types import TrainBatch, Trajectory  # noqa: E402

# dense bf16 tensor-core peak (no sparsity), by a substring of torch.cuda.get_device_name()
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))


# -- the workload ----------------------------------------------------------------------------------


def lognormal_lengths(
    n: int, median: float, sigma: float, lo: int, hi: int, seed: int = 0
) -> list[int]:
    """`n` sequence lengths, lognormal around `median`, clipped to [lo, hi]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64) * sigma + math.log(median)
    return [int(v) for v in x.exp().round().clamp(lo, hi)]


def synthetic_batch(lengths: list[int], vocab: int, seed: int = 0) -> TrainBatch:
    """A TrainBatch of random trajectories: the first quarter prompt, the rest sampled with
    behaviour log-probs in [-4, 0) and a +-1 advantage per trajectory."""
    g = torch.Generator().manual_seed(seed)
    trajs, advantages = [], []
    for i, n in enumerate(lengths):
        prompt = max(1, n // 4)
        mask = [0] * prompt + [1] * (n - prompt)
        lps = (-4 * torch.rand(n, generator=g, dtype=torch.float64)).tolist()
        trajs.append(
            Trajectory(
                task_id=f"t{i}",
                env="synthetic",
                group_id=f"g{i // 8}",
                tokens=torch.randint(3, vocab, (n,), generator=g).tolist(),
                loss_mask=mask,
                logprobs=[lp if m else 0.0 for lp, m in zip(lps, mask)],
                versions=[0 if m else -1 for m in mask],
                prompt_len=prompt,
                reward=float(i % 2),
            )
        )
        advantages.append(grpo.token_advantages(1.0 if i % 2 else -1.0, mask, "broadcast"))
    return TrainBatch(trajs, advantages)


# -- the padded step -------------------------------------------------------------------------------


def padded_token_logprobs(
    model: torch.nn.Module, input_ids: torch.Tensor, target_ids: torch.Tensor, temperature, chunk
) -> tuple[torch.Tensor, torch.Tensor]:
    """rl.learner.token_logprobs for [B, L] rows (plain positions): log-probs and entropies [B, L],
    lm_head over chunks of positions under checkpointing, pads included."""
    B, L = input_ids.shape
    targets = target_ids.reshape(-1)

    def head_chunk(h, t, lm_head):
        logp = (lm_head(h).float() / temperature).log_softmax(-1)
        entropy = -(logp.exp() * logp).sum(-1)
        return logp.gather(-1, t[:, None])[:, 0], entropy

    def head(hidden, lm_head):
        flat = hidden.reshape(B * L, -1)
        lps, ents = [], []
        for s in range(0, B * L, chunk):
            lp, ent = checkpoint(
                head_chunk, flat[s : s + chunk], targets[s : s + chunk], lm_head,
                use_reentrant=False,
            )  # fmt: skip
            lps.append(lp)
            ents.append(ent)
        return torch.cat(lps).view(B, L), torch.cat(ents).view(B, L)

    positions = torch.arange(L, device=input_ids.device).expand(B, L)
    return model(input_ids, positions, head=head)


def padded_batches(
    batch: TrainBatch, batch_size: int, by_length: bool = False
) -> list[dict[str, torch.Tensor]]:
    """The batch's trajectories, `batch_size` per [B, Lmax] tensor set (pads at the end: token 0,
    not in the loss), in arrival order or sorted by length (`by_length`: length bucketing).
    Position t predicts token t + 1, as in rl/packing.py."""
    out = []
    trajs, advs = batch.trajectories, batch.advantages
    order = list(range(len(trajs)))
    if by_length:
        order.sort(key=lambda i: len(trajs[i].tokens))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        L = max(len(trajs[i].tokens) for i in rows)
        t = {
            "input_ids": torch.zeros(len(rows), L, dtype=torch.long),
            "target_ids": torch.zeros(len(rows), L, dtype=torch.long),
            "loss_mask": torch.zeros(len(rows), L, dtype=torch.bool),
            "behaviour_logprobs": torch.zeros(len(rows), L),
            "advantages": torch.zeros(len(rows), L),
        }
        for r, i in enumerate(rows):
            tr, n = trajs[i], len(trajs[i].tokens)
            t["input_ids"][r, :n] = torch.tensor(tr.tokens)
            t["target_ids"][r, : n - 1] = torch.tensor(tr.tokens[1:])
            t["loss_mask"][r, : n - 1] = torch.tensor(tr.loss_mask[1:], dtype=torch.bool)
            t["behaviour_logprobs"][r, : n - 1] = torch.tensor(tr.logprobs[1:])
            t["advantages"][r, : n - 1] = torch.tensor(advs[i][1:])
        out.append(t)
    return out


def padded_train_step(
    learner: Learner, batches: list[dict[str, torch.Tensor]], normaliser: float
) -> float:
    """One optimizer step over padded batches with the learner's model, loss, optimizer and
    schedule; returns the batch's loss (equal to the packed step's on the same weights)."""
    cfg = learner.config
    learner.model.train()
    total = 0.0
    for b in batches:
        b = {k: v.to(learner.device) for k, v in b.items()}
        lp, entropy = padded_token_logprobs(
            learner.model,
            b["input_ids"],
            b["target_ids"],
            cfg.logprob_temperature,
            cfg.logprob_chunk,
        )
        loss, _ = grpo.policy_loss(
            lp, b["behaviour_logprobs"], b["advantages"], b["loss_mask"], cfg.loss,
            old_logprobs=lp.detach(), normaliser=normaliser, entropy=entropy.detach(),
        )  # fmt: skip
        learner._backward(loss)
        total += float(loss.detach())
    learner._optimizer_step()
    learner.scheduler.step()
    learner.step += 1
    return total


# -- timing ----------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(modes: dict, steps: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per step of each mode: one warm-up step each, then `steps` rounds, the modes
    interleaved so that load from other processes hits them alike."""
    for fn in modes.values():
        fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(steps):
        for name, fn in modes.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def packed_vs_padded(args) -> dict:
    torch.manual_seed(args.seed)
    overrides = dict(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(1, args.hidden // 192), head_dim=64,
    )  # fmt: skip
    spec = ModelSpec("preset:cwm-1b", overrides=overrides, init_seed=args.seed)
    config = LearnerConfig(
        optim=OptimConfig(lr=1e-5),
        loss=grpo.LossConfig(aggregation="token-mean"),
        micro_batch_tokens=args.micro_batch_tokens,
    )
    learner = Learner(config, spec, num_threads=args.threads)
    lengths = lognormal_lengths(
        args.sequences, args.median_len, args.sigma, args.min_len, args.max_len, args.seed
    )
    batch = synthetic_batch(lengths, args.vocab, args.seed)
    normaliser = grpo.loss_normaliser([t.loss_mask for t in batch.trajectories], config.loss)
    padded = {"padded": padded_batches(batch, args.padded_batch_size)}
    if args.sorted_padded:
        padded["padded_sorted"] = padded_batches(batch, args.padded_batch_size, by_length=True)
    bins = pack(lengths, args.micro_batch_tokens)
    rows = [sum(lengths[i] for i in b) for b in bins]

    modes = {"packed": lambda: learner.train_step(batch)}
    for name, batches in padded.items():
        modes[name] = lambda batches=batches: padded_train_step(learner, batches, normaliser)
    times = time_steps(modes, args.steps, learner.device)
    real = sum(lengths)
    shape = {"packed": dict(rows=len(rows), computed=sum(rows), attention=sum(r * r for r in rows))}
    for name, batches in padded.items():
        shape[name] = dict(
            rows=len(batches),
            computed=sum(b["input_ids"].numel() for b in batches),
            attention=sum(b["input_ids"].shape[0] * b["input_ids"].shape[1] ** 2 for b in batches),
        )
    result = {"real_tokens": real, "sequences": len(lengths)}
    print(
        f"\nmodel: CWM hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, "
        f"{learner.model_config.num_params / 1e6:.1f}M params; {args.threads} threads; "
        f"{len(lengths)} sequences, lengths {min(lengths)}..{max(lengths)} "
        f"(median {int(statistics.median(lengths))}, mean {real / len(lengths):.0f}), "
        f"{real} real tokens per step\n"
    )
    header = (
        f"{'mode':<20}{'batches':>8}{'computed tok':>14}{'pad waste':>11}{'attn cells':>12}"
        f"{'s/step best':>13}{'s/step mean':>13}{'real tok/s':>12}"
    )
    print(header)
    print("-" * len(header))
    labels = {
        "padded": f"padded (B={args.padded_batch_size})",
        "padded_sorted": f"padded sorted (B={args.padded_batch_size})",
        "packed": f"packed ({args.micro_batch_tokens} tok)",
    }
    for name in [*padded, "packed"]:
        s = shape[name]
        best, mean = min(times[name]), statistics.fmean(times[name])
        print(
            f"{labels[name]:<20}{s['rows']:>8}{s['computed']:>14}"
            f"{1 - real / s['computed']:>11.0%}{s['attention'] / 1e6:>11.1f}M"
            f"{best:>13.2f}{mean:>13.2f}{real / best:>12.0f}"
        )
        result[f"{name}_tokens_per_s"] = round(real / best, 1)
        result[f"{name}_computed_tokens"] = s["computed"]
        result[f"{name}_seconds_per_step"] = [round(t, 3) for t in times[name]]
    result["speedup_packed_vs_padded"] = round(
        result["packed_tokens_per_s"] / result["padded_tokens_per_s"], 2
    )
    print(f"\npacked / padded: {result['speedup_packed_vs_padded']:.2f}x real tokens/s")
    if args.sorted_padded:
        result["speedup_packed_vs_padded_sorted"] = round(
            result["packed_tokens_per_s"] / result["padded_sorted_tokens_per_s"], 2
        )
        print(
            f"packed / padded sorted by length: "
            f"{result['speedup_packed_vs_padded_sorted']:.2f}x real tokens/s"
        )
    return result


def peak_bf16_flops(name: str) -> float | None:
    for key, flops in PEAK_BF16_FLOPS:
        if key in name:
            return flops
    return None


def mfu(args, preset: str, device: torch.device) -> dict:
    """Tokens/s and MFU of packed learner steps (bf16 autocast, fp32 master weights and AdamW)."""
    spec = ModelSpec(f"preset:{preset}", init_seed=args.seed)
    config = LearnerConfig(
        optim=OptimConfig(lr=1e-5),
        loss=grpo.LossConfig(aggregation="token-mean"),
        micro_batch_tokens=args.mfu_micro_batch_tokens,
        param_dtype="float32",  # master weights; compute in bf16 under autocast
        # SDPA with a document mask and GQA falls back to the math kernel, whose [H, T, T] scores
        # per layer would not fit 16 layers at 8k tokens: recompute blocks in backward
        activation_checkpointing=not args.mfu_no_activation_checkpointing,
    )
    learner = Learner(config, spec)
    vocab = learner.model_config.vocab_size
    budget = args.mfu_micro_batch_tokens
    lengths = lognormal_lengths(4 * budget // 512, 512, 1.0, 16, budget, args.seed)
    batch = synthetic_batch(lengths, vocab, args.seed)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            learner.train_step(batch)

    times = time_steps({"packed": step}, args.steps, device)["packed"]
    tokens_per_s = sum(lengths) / min(times)
    mc = learner.model_config
    # matmul parameters: all but the input embedding (a lookup); attention scores not counted
    params = mc.num_params - (0 if mc.tie_word_embeddings else mc.vocab_size * mc.hidden_size)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = peak_bf16_flops(name)
    out = {
        "model": preset,
        "params": mc.num_params,
        "matmul_params": params,
        "activation_checkpointing": config.activation_checkpointing,
        "device": name,
        "micro_batch_tokens": budget,
        "micro_batches": len(pack(lengths, budget)),
        "tokens_per_step": sum(lengths),
        "tokens_per_s": round(tokens_per_s, 1),
        "peak_bf16_flops": peak,
        "mfu": round(6 * params * tokens_per_s / peak, 4) if peak else None,
    }
    if device.type == "cuda":
        out["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    print(f"\nMFU ({preset}, packed {budget}-token micro-batches, bf16 autocast): {out}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per mode (after 1 warm-up)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--sequences", type=int, default=32)
    ap.add_argument("--median-len", type=float, default=128)
    ap.add_argument("--sigma", type=float, default=1.0, help="lognormal sigma of the lengths")
    ap.add_argument("--min-len", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--micro-batch-tokens", type=int, default=2048)
    ap.add_argument("--padded-batch-size", type=int, default=8)
    ap.add_argument(
        "--sorted-padded", action="store_true", help="also time padded batches sorted by length"
    )
    ap.add_argument("--mfu-micro-batch-tokens", type=int, default=8192)
    ap.add_argument("--mfu-no-activation-checkpointing", action="store_true")
    ap.add_argument(
        "--mfu-smoke", action="store_true", help="run the MFU code path on CPU (tiny model)"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    result = packed_vs_padded(args)
    if torch.cuda.is_available():
        result["gpu_mfu"] = mfu(args, "cwm-1b", torch.device("cuda"))
    elif args.mfu_smoke:
        args.mfu_micro_batch_tokens = 512
        result["cpu_mfu_smoke"] = mfu(args, "tiny", torch.device("cpu"))
    else:
        print("\nMFU mode (cwm-1b, packed 8k-token micro-batches, bf16): skipped, no GPU here")
        result["gpu_mfu"] = None
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
