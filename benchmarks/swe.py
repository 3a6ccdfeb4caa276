"""SWE episodes per minute and per-step latency: docker backend vs local backend.

A scripted agent (fixed tool calls, no model) solves built tasks through reset/step: look at the
repository, edit the bug away with one SEARCH/REPLACE block, run the visible tests and write
`git diff` to a file, submit it, finish. Every episode must score +1. Measured per backend:
sandbox start and repository setup (copy + history scrub) at reset, one tool call (an exec in
the sandbox), scoring (a fresh sandbox, patch, hidden tests), the whole episode, and episodes per
minute at the given concurrency. Backends: `local` (bubblewrap), `docker` (the repository
copied into a `cwm-rl/host` container) and `docker-image` (each task's own image, built first).
Prints a table and a final `RESULT {json}` line (ratio = docker time / local time).

    python benchmarks/swe.py [--episodes 8] [--concurrency 1] [--backends local,docker,docker-image]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from envs.base import Task  # noqa: E402
from envs.swe import SWEEnv  # noqa: E402
from envs.swe.catalog import Bug, Project  # noqa: E402
from envs.swe.projects import PROJECTS  # noqa: E402

BACKENDS = {
    "local": {"backend": "local"},
    "docker": {"backend": "docker", "use_task_images": False},
    "docker-image": {"backend": "docker", "use_task_images": True},
}


def edit_block(project: Project, bug: Bug) -> tuple[str, str]:
    """(search, replace) turning the buggy module back into the fixed one: the changed lines
    with two lines of context, so the search text is unique."""
    at = project.source.index(bug.fixed)
    before = project.source[:at].split("\n")
    after = project.source[at + len(bug.fixed) :].split("\n")
    head = "\n".join(before[-3:])  # two full lines and the start of the changed one
    tail = "\n".join(after[:3])
    return head + bug.buggy + tail, head + bug.fixed + tail


def scripted_replies(task: Task) -> list[str]:
    project_name, bug_name = task.payload["instance_id"].split("__")
    project = next(p for p in PROJECTS if p.name == project_name)
    bug = next(b for b in project.bugs if b.name == bug_name)
    search, replace = edit_block(project, bug)
    module = f"{project.name}/{project.module}.py"
    return [
        f"<tool: bash>\nls && git log --oneline | cat && head -20 {module}\n</tool>",
        f"<tool: edit>\n{module}\n<<<<<<< SEARCH\n{search}\n=======\n{replace}\n"
        ">>>>>>> REPLACE\n</tool>",
        f"<tool: bash>\npython3 -m unittest -q tests.test_{project.module} 2>&1 | tail -1"
        " && git diff > /tmp/fix.patch\n</tool>",
        "<tool: submit>\n/tmp/fix.patch\n</tool>",
        "The fix is submitted.",
    ]


async def one_episode(config: dict, task: Task) -> dict:
    env = SWEEnv(config)
    start = time.monotonic()
    try:
        await env.reset(task)
        reset_s = time.monotonic() - start
        step_times = []
        for reply in scripted_replies(task):
            t0 = time.monotonic()
            result = await env.step(reply)
            step_times.append(time.monotonic() - t0)
            if result.done:
                break
    finally:
        await env.close()
    if result.reward != 1.0:
        raise RuntimeError(f"{task.id}: scripted agent got {result.reward} ({result.info})")
    info = result.info
    return {
        "episode_s": time.monotonic() - start,
        "reset_s": reset_s,
        "sandbox_start_s": info["sandbox_start_s"],
        "repo_setup_s": info["repo_setup_s"],
        "exec_s": info["agent_exec_s"] / info["agent_execs"],
        "tool_step_s": statistics.mean(step_times[:-1]),
        "scoring_s": info["score_total_s"],
        "score_sandbox_start_s": info["score_sandbox_start_s"],
        "score_tests_s": info["score_tests_s"],
    }


async def run_backend(config: dict, tasks: list[Task], concurrency: int) -> tuple[list, float]:
    gate = asyncio.Semaphore(concurrency)

    async def limited(task: Task) -> dict:
        async with gate:
            return await one_episode(config, task)

    start = time.monotonic()
    rows = await asyncio.gather(*(limited(t) for t in tasks))
    return rows, time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=8, help="episodes per backend")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--backends", default="local,docker,docker-image")
    parser.add_argument("--tasks-dir", help="built tasks (default: a fresh temp dir)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tasks_dir = args.tasks_dir or str(Path(tempfile.mkdtemp(prefix="swe-bench-")) / "tasks")
    base = {"source": "builtin", "tasks_dir": tasks_dir, "command_timeout_s": 30.0}
    probe = SWEEnv(base)
    tasks = (probe.load_tasks("train") + probe.load_tasks("test"))[: args.episodes]
    results: dict[str, dict] = {}
    for name in args.backends.split(","):
        config = {**base, **BACKENDS[name]}
        if config["backend"] == "docker":
            from sandbox.docker import docker_unavailable_reason

            reason = docker_unavailable_reason()
            if reason is not None:
                print(f"{name}: skipped ({reason})")
                continue
            if config["use_task_images"]:
                from envs.swe.build_tasks import build_images
                from envs.swe.instances import SWEInstance

                t0 = time.monotonic()
                build_images([SWEInstance.from_payload(t.payload) for t in tasks])
                print(f"{name}: task images ready in {time.monotonic() - t0:.1f} s")
        asyncio.run(one_episode(config, tasks[0]))  # warm-up (images, caches)
        rows, wall = asyncio.run(run_backend(config, tasks, args.concurrency))
        summary = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
        summary["episodes_per_min"] = 60 * len(rows) / wall
        results[name] = summary
    keys = list(next(iter(results.values())))
    print(f"{'median seconds':24}" + "".join(f"{name:>14}" for name in results))
    for key in keys:
        print(f"{key:24}" + "".join(f"{results[n][key]:14.3f}" for n in results))
    result = {
        "episodes": len(tasks),
        "concurrency": args.concurrency,
        **{name: {k: round(v, 4) for k, v in row.items()} for name, row in results.items()},
    }
    if "local" in results:
        for name in ("docker", "docker-image"):
            if name in results:
                result[f"{name}_vs_local_episode_ratio"] = round(
                    results[name]["episode_s"] / results["local"]["episode_s"], 2
                )
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
