"""The GPU check: one command that runs the CUDA paths of the model, the learner and the engine on
one CUDA GPU and says whether each is right and how fast it is (< 8 minutes on an H100).

1. forward: a CWM-shaped model (preset cwm-1b, `--forward-layers` layers) in bf16 and in fp32 on
   the GPU vs the fp32 CPU forward of the same weights, on a packed row of several documents (the
   sliding and global layers and the document mask all used): fp32 must match to 2e-3 in
   log-prob, bf16 must agree on >= 95% of the argmax tokens with a mean |log-prob diff| < 0.05.
2. learner: FSDP2 (world 1, NCCL, bf16 compute with fp32 master weights and reduction) steps of
   `Learner.train_step` on the ~1B cwm-1b with packed 8k-token rows: tokens/s and
   MFU = 6 * matmul params * tokens/s / the GPU's peak dense bf16 FLOP/s.
3. engine: NativeEngine decode tokens/s on cwm-1b in bf16 at batch 1 and 64 (sampling, no stop).
4. flash-attn: when `flash_attn` imports, the varlen kernel (attn_backend "flash") vs SDPA per
   document ("docs") on the same packed bf16 row: outputs within 2e-2.

Each part runs on its own: a failure is recorded (with its traceback's last line) and the next
part runs. Exit status 1 if any check failed. `--cpu-smoke` runs every code path on the CPU with
the tiny preset (CI-sized; nothing CUDA-only), so the script cannot break unnoticed between GPUs.

    python benchmarks/gpu.py [--cpu-smoke]

Prints each part as it finishes and a final `RESULT {json}` line."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.learner import lognormal_lengths, peak_bf16_flops, synthetic_batch  # noqa: E402
from model import CWM, CWMConfig  # noqa: E402
from model.cwm import flash_attn_varlen_func  # noqa: E402
from model.loader import ModelSpec  # noqa: E402
from rl import grpo  # noqa: E402
from rl.engines.base import SamplingParams  # noqa: E402
from rl.engines.native import NativeEngine  # noqa: E402
from rl.learner import Learner, LearnerConfig, OptimConfig  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def packed_row(lengths: list[int], vocab: int, seed: int = 0):
    """One packed row: ids [1, T] and positions restarting at 0 for every document."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (1, sum(lengths)), generator=g)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    return ids, positions


def make_model(preset: str, layers: int | None, seed: int) -> CWM:
    overrides = {} if layers is None else {"num_hidden_layers": layers}
    torch.manual_seed(seed)
    model = CWM(CWMConfig.preset(preset, **overrides))
    model.init_weights()
    return model.eval()


# -- 1. forward ------------------------------------------------------------------------------------


@torch.no_grad()
def check_forward(args, device: torch.device) -> dict:
    model = make_model(args.preset, args.forward_layers, args.seed)
    window = model.config.sliding_window or 64
    # documents shorter and longer than the sliding window, so both layer kinds differ from plain
    lengths = [window // 2, 3 * window, window + 7, args.forward_tokens]
    ids, positions = packed_row(lengths, model.config.vocab_size, args.seed)
    reference = model(ids, positions).float().log_softmax(-1)  # fp32, CPU
    out = {"tokens": int(ids.numel()), "layers": model.config.num_hidden_layers}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        m = model.to(device=device, dtype=dtype)
        t0 = time.perf_counter()
        lp = m(ids.to(device), positions.to(device)).float().log_softmax(-1).cpu()
        sync(device)
        diff = (lp - reference).abs()
        top1 = (lp.argmax(-1) == reference.argmax(-1)).float().mean().item()
        # the log-prob of the reference's own argmax token: what sampling and the loss read
        chosen = reference.argmax(-1, keepdim=True)
        lp_diff = (lp.gather(-1, chosen) - reference.gather(-1, chosen)).abs()
        out[name] = {
            "max_abs_logprob_diff": round(diff.max().item(), 5),
            "mean_abs_chosen_logprob_diff": round(lp_diff.mean().item(), 5),
            "argmax_agreement": round(top1, 4),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        model = model.float().cpu()
    fp32, bf16 = out["fp32"], out["bf16"]
    out["ok"] = (
        fp32["max_abs_logprob_diff"] < 2e-3
        and bf16["argmax_agreement"] >= 0.95
        and bf16["mean_abs_chosen_logprob_diff"] < 0.05
    )
    return out


# -- 2. learner ------------------------------------------------------------------------------------


def learner_mfu(args, device: torch.device) -> dict:
    """FSDP2 at world 1 (the Learner shards whenever param_dtype is set: bf16 compute)."""
    overrides = {} if args.learner_layers is None else {"num_hidden_layers": args.learner_layers}
    spec = ModelSpec(f"preset:{args.preset}", overrides=overrides, init_seed=args.seed)
    config = LearnerConfig(
        optim=OptimConfig(lr=1e-5),
        loss=grpo.LossConfig(aggregation="token-mean"),
        micro_batch_tokens=args.row_tokens,
        param_dtype="bfloat16",  # FSDP2 mixed precision: bf16 gathers, fp32 master + reduce
        activation_checkpointing=True,
    )
    learner = Learner(config, spec)
    assert learner.use_fsdp, "the learner did not shard (FSDP2 expected)"
    mc = learner.model_config
    lengths = lognormal_lengths(
        2 * args.row_tokens // 512, 512, 1.0, 16, args.row_tokens, args.seed
    )
    batch = synthetic_batch(lengths, mc.vocab_size, args.seed)
    learner.train_step(batch)  # warm-up
    times = []
    for _ in range(args.steps):
        sync(device)
        t0 = time.perf_counter()
        metrics = learner.train_step(batch)
        sync(device)
        times.append(time.perf_counter() - t0)
    tokens_per_s = sum(lengths) / min(times)
    params = mc.num_params - (0 if mc.tie_word_embeddings else mc.vocab_size * mc.hidden_size)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = peak_bf16_flops(name)
    out = {
        "params": mc.num_params,
        "matmul_params": params,
        "row_tokens": args.row_tokens,
        "tokens_per_step": sum(lengths),
        "step_s": round(min(times), 3),
        "tokens_per_s": round(tokens_per_s, 1),
        "peak_bf16_flops": peak,
        "mfu": round(6 * params * tokens_per_s / peak, 4) if peak else None,
        "loss_finite": math.isfinite(metrics["loss"]),
        "grad_norm": round(float(metrics["grad_norm"]), 4),
    }
    if device.type == "cuda":
        out["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    out["ok"] = out["loss_finite"] and math.isfinite(out["grad_norm"])
    learner.shutdown()
    return out


# -- 3. engine -------------------------------------------------------------------------------------


def engine_decode(args, device: torch.device) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = make_model(args.preset, args.engine_layers, args.seed).to(device=device, dtype=dtype)
    engine = NativeEngine(model)
    vocab = model.config.vocab_size
    out = {}
    for batch in args.batches:
        g = torch.Generator().manual_seed(batch)
        prompts = [torch.randint(3, vocab, (64,), generator=g).tolist() for _ in range(batch)]
        params = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, seed=0)
        engine.generate(prompts[:1], SamplingParams(max_new_tokens=4))  # warm-up
        sync(device)
        t0 = time.perf_counter()
        outs = engine.generate(prompts, params)
        sync(device)
        seconds = time.perf_counter() - t0
        tokens = sum(len(o.token_ids) for o in outs)
        finite = all(math.isfinite(lp) for o in outs for lp in o.logprobs)
        out[f"batch_{batch}"] = {
            "tokens_per_s": round(tokens / seconds, 1),
            "tokens": tokens,
            "logprobs_finite": finite,
        }
    engine.close()
    out["ok"] = all(v["logprobs_finite"] for v in out.values())
    return out


# -- 4. flash-attn ---------------------------------------------------------------------------------


@torch.no_grad()
def flash_parity(args, device: torch.device) -> dict:
    if flash_attn_varlen_func is None:
        return {"skipped": "flash_attn does not import here"}
    if device.type != "cuda":
        return {"skipped": "flash-attn needs CUDA"}
    model = make_model(args.preset, args.forward_layers, args.seed)
    model = model.to(device=device, dtype=torch.bfloat16)
    window = model.config.sliding_window or 64
    ids, positions = packed_row([window // 2, 3 * window, 2048], model.config.vocab_size)
    ids, positions = ids.to(device), positions.to(device)
    outs = {}
    for backend in ("docs", "flash"):
        model.attn_backend = backend
        outs[backend] = model.hidden_states(ids, positions).float()
    diff = (outs["flash"] - outs["docs"]).abs()
    scale = outs["docs"].abs().max().item()
    out = {"max_abs_diff": round(diff.max().item(), 5), "hidden_max_abs": round(scale, 3)}
    out["ok"] = diff.max().item() <= 2e-2 * max(1.0, scale)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="every path on CPU, tiny preset")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    if args.cpu_smoke:
        device = torch.device("cpu")
        torch.set_num_threads(min(2, os.cpu_count() or 1))
        args.preset, args.forward_layers, args.learner_layers, args.engine_layers = (
            "tiny",
            None,
            None,
            None,
        )
        args.forward_tokens, args.row_tokens, args.batches, args.new_tokens = 64, 1024, [1, 4], 8
        args.steps = 1
    else:
        if not torch.cuda.is_available():
            sys.exit("benchmarks/gpu.py needs a CUDA GPU (or --cpu-smoke)")
        device = torch.device("cuda")
        args.preset = "cwm-1b"
        args.forward_layers, args.learner_layers, args.engine_layers = 4, None, None
        args.forward_tokens, args.row_tokens, args.batches, args.new_tokens = (
            1024,
            8192,
            [1, 64],
            128,
        )
    result: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    failed = []
    for name, part in (
        ("forward", check_forward),
        ("learner", learner_mfu),
        ("engine", engine_decode),
        ("flash_attn", flash_parity),
    ):
        t0 = time.perf_counter()
        try:
            out = part(args, device)
        except Exception as e:  # noqa: BLE001 - recorded, the next part still runs
            traceback.print_exc()
            out = {"ok": False, "error": f"{type(e).__name__}: {e}"[:500]}
        out["wall_s"] = round(time.perf_counter() - t0, 1)
        result[name] = out
        if out.get("ok") is False:
            failed.append(name)
        print(f"{name}: {json.dumps(out)}", flush=True)
    result["failed"] = failed
    print("RESULT " + json.dumps(result))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
