"""The TRL side of benchmarks/peer_trl.py: TRL's GRPOTrainer on the demo's job. Runs inside
.venv-trl (TRL is no dependency of cwm-rl); benchmarks/peer_trl.py writes its input and reads its
output. Not meant to be run by hand:

    .venv-trl/bin/python benchmarks/peer_trl_driver.py SPEC.json OUT_DIR [--replay TRAJ.jsonl]

SPEC.json (written by peer_trl.py from this repository's own task source, in .venv) holds the base
model directory, the training prompts in the order cwm-rl draws them (task id, answer, the prompt
token ids cwm-rl's rollout workers feed the model and the same ids rendered as text), the judge
options of the math environment and the run's settings. TRL gets the prompts as pre-rendered text;
every batch, the prompt ids TRL actually fed the model are checked against cwm-rl's ids (and the
task order against cwm-rl's order), so a tokenisation or ordering difference stops the run.
Rewards come from the repository's own scorer: the completion ids are turned into text by
model/chat.py (as the rollout workers do) and judged by rewards.math.judge with the environment's
options, the call envs/math.py makes.

--replay: TRL generates nothing. Each batch's completions are the ones cwm-rl sampled at that
step (a run's trajectories.jsonl, `save_trajectories=true`), row for row, so both trainers update
from identical data; the final weights then differ only by the updates. The prompt ids of every
replayed trajectory are checked against what TRL fed, the completion must be one turn.

Writes OUT_DIR/final (the trained policy, an HF directory without tokenizer files) and
OUT_DIR/result.json (seconds per step, per-step reward means, checks done)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from model.chat import ChatFormat  # noqa: E402  (pure Python: the rollout workers' chat format)
from rewards.math import judge  # noqa: E402  (pure Python: the math environment's scorer)


class StepTimer(TrainerCallback):
    """Wall-clock seconds of each optimizer step: generation, scoring, forward, backward, clip,
    AdamW (Trainer's on_step_begin .. on_step_end; logging and saving come after on_step_end)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._t0 = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._t0)


class CheckedGRPOTrainer(GRPOTrainer):
    """GRPOTrainer that checks, for every generation batch, that the prompt token ids it fed the
    model are cwm-rl's (left padding removed) and that the tasks come in cwm-rl's order."""

    def __init__(
        self,
        *args,
        expected_order: list[str],
        group_size: int,
        groups: int,
        replay: list[list[dict]] | None = None,
        **kw,
    ):
        super().__init__(*args, **kw)
        self.expected_order, self.group_size, self.groups = expected_order, group_size, groups
        self.replay = replay  # per batch: cwm-rl's trajectories in TRL's row order
        self.batches_checked = 0
        self.prompts_checked = 0
        self.generate_score_s: list[float] = []  # generation + scoring (+ its log-prob passes)

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, *a):
        if self.replay is None:
            return super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, *a
            )
        b = self.batches_checked
        rows = self.replay[b]
        if len(rows) != len(prompt_ids):
            raise SystemExit(
                f"replay batch {b}: {len(rows)} trajectories, TRL has {len(prompt_ids)}"
            )
        completions = []
        for i, (fed, t) in enumerate(zip(prompt_ids, rows)):
            n = t["prompt_len"]
            if list(fed) != t["tokens"][:n] or 0 in t["loss_mask"][n:]:
                raise SystemExit(
                    f"replay batch {b} row {i}: trajectory {t['group_id']} does not continue the "
                    f"prompt TRL fed, or is not one sampled turn"
                )
            completions.append(t["tokens"][n:])
        return completions, None

    def _generate_and_score_completions(self, inputs):
        t0 = time.perf_counter()
        out = super()._generate_and_score_completions(inputs)
        self.generate_score_s.append(time.perf_counter() - t0)
        b = self.batches_checked
        want = self.expected_order[b * self.groups : (b + 1) * self.groups]
        got = [x["task_id"] for x in inputs[:: self.group_size]]
        repeated = [x["task_id"] for x in inputs] == [
            t for t in want for _ in range(self.group_size)
        ]
        if got != want or not repeated:
            raise SystemExit(
                f"TRL batch {b}: tasks {got} (each x{self.group_size}), cwm-rl's {want}"
            )
        for i, (row, mask, x) in enumerate(zip(out["prompt_ids"], out["prompt_mask"], inputs)):
            fed = row[mask.bool()].tolist()
            if fed != x["expected_ids"]:
                raise SystemExit(
                    f"TRL batch {b} row {i} (task {x['task_id']}): TRL fed the model prompt ids "
                    f"{fed}, cwm-rl feeds {x['expected_ids']}"
                )
            self.prompts_checked += 1
        self.batches_checked += 1
        return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--replay", type=Path, help="cwm-rl's trajectories.jsonl: train on those")
    ns = ap.parse_args()
    spec = json.loads(ns.spec.read_text())
    s = spec["settings"]
    torch.set_num_threads(s["threads"])

    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    chat = ChatFormat.from_tokenizer(tokenizer, reasoning=False)
    tasks = spec["tasks"]
    # text -> ids as TRL tokenises a text prompt (GRPOTrainer._tokenize_prompts): must give our ids
    retokenized = tokenizer(text=[t["prompt_text"] for t in tasks])["input_ids"]
    bad = [t["id"] for t, ids in zip(tasks, retokenized) if list(ids) != t["prompt_ids"]]
    if bad:
        raise SystemExit(f"prompt text does not tokenise back to cwm-rl's ids for tasks {bad[:5]}")

    dataset = Dataset.from_list(
        [
            {
                "prompt": t["prompt_text"],
                "answer": t["answer"],
                "task_id": t["id"],
                "expected_ids": t["prompt_ids"],
            }
            for t in tasks
        ]
    )
    judge_kw = spec["judge"]

    def math_reward(prompts, completions, completion_ids, answer, **_):
        # as the rollout worker + MathEnv.step: stop tokens dropped, decoded exactly, judged
        return [
            judge(chat.response_text(ids), str(a), **judge_kw).reward
            for ids, a in zip(completion_ids, answer)
        ]

    batch = s["groups_per_step"] * s["group_size"]
    args = GRPOConfig(
        output_dir=str(ns.out / "trainer"),
        seed=spec["seed"],
        max_steps=s["steps"],
        # one generation batch = one optimizer step over all of it, no accumulation, one pass
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_iterations=1,
        num_generations=s["group_size"],
        shuffle_dataset=False,  # the prompts in cwm-rl's order (checked every batch)
        # sampling (and the temperature of the log-probs)
        max_completion_length=s["max_new_tokens"],
        temperature=s["temperature"],
        top_p=s["top_p"],
        top_k=s["top_k"],
        repetition_penalty=1.0,
        # loss: advantage r - group mean, token-mean over the batch, asymmetric clip, no KL
        scale_rewards="none",
        loss_type="dapo",
        importance_sampling_level="token",
        epsilon=s["eps_low"],
        epsilon_high=s["eps_high"],
        beta=0.0,
        mask_truncated_completions=False,
        # optimizer
        optim="adamw_torch",
        learning_rate=s["lr"],
        adam_beta1=s["betas"][0],
        adam_beta2=s["betas"][1],
        adam_epsilon=s["adam_eps"],
        weight_decay=s["weight_decay"],
        max_grad_norm=s["grad_clip"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        # CPU, fp32, no activation checkpointing (TRL's defaults: bf16 and checkpointing on)
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
    )
    replay = None
    if ns.replay:
        steps = [json.loads(x) for x in ns.replay.read_text().splitlines() if x.strip()]
        replay = [[t for g in row["groups"] for t in g["trajectories"]] for row in steps]
        replayed = [g["trajectories"][0]["task_id"] for row in steps for g in row["groups"]]
        want = [t["id"] for t in tasks][: len(replayed)]
        if replayed != want or len(replay) < s["steps"]:
            raise SystemExit(
                f"{ns.replay}: its tasks are not the spec's, or fewer than {s['steps']} steps"
            )
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    timer = StepTimer()
    trainer = CheckedGRPOTrainer(
        model=model,
        reward_funcs=math_reward,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[timer],
        expected_order=[t["id"] for t in tasks],
        group_size=s["group_size"],
        groups=s["groups_per_step"],
        replay=replay,
    )
    if set(trainer.eos_token_ids) != set(chat.stop_token_ids):
        raise SystemExit(
            f"TRL stops generation at {trainer.eos_token_ids}, cwm-rl at {chat.stop_token_ids}"
        )
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    final = ns.out / "final"
    trainer.model.save_pretrained(final, safe_serialization=True)
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    result = {
        "trl": __import__("trl").__version__,
        "transformers": __import__("transformers").__version__,
        "torch": torch.__version__,
        "step_s": timer.seconds,
        "generate_score_s": trainer.generate_score_s,
        "replay": str(ns.replay) if ns.replay else None,
        "train_s": train_s,
        "reward_mean": rewards,
        "batches_checked": trainer.batches_checked,
        "prompts_checked": trainer.prompts_checked,
        "eos_token_ids": list(trainer.eos_token_ids),
        "stop_token_ids": list(chat.stop_token_ids),
        "final": str(final),
    }
    (ns.out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "reward_mean"}))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
