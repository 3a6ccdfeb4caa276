"""SWE tool calls per second: the agent's bash as one long-lived shell (sandbox.base.Shell, the
default) vs the emulation (a fresh bash per call that restores the previous call's working
directory and exported variables), side by side in one process, on the docker backend (the
repository copied into a `cwm-rl/host` container) or the local one (bubblewrap).

Each side opens a workspace on the same built task and runs the same calls: `--calls` bash commands (a cd, a grep over the repository,
an echo) and `--edits` edit-tool calls (the tool helper, through the same session). Prints calls
per second for each, the ratio, and a final `RESULT {json}` line.

    python benchmarks/shell.py [--calls 60] [--edits 10] [--backend docker|local]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from envs.swe import tools  # noqa: E402
from envs.swe.build_tasks import build_tasks  # noqa: E402
from envs.swe.instances import load_instances  # noqa: E402
from envs.swe.workspace import SandboxSpec, open_workspace  # noqa: E402

COMMANDS = ("cd textkit && pwd", "grep -rn 'def ' . | wc -l", "cd .. && echo $RANDOM")


def measure(instance, backend: str, real_shell: bool, calls: int, edits: int) -> dict:
    spec = SandboxSpec(backend=backend, use_task_images=False, real_shell=real_shell)
    workspace = open_workspace(instance, spec, scrub=True)
    try:
        workspace.run("cmd", "true", timeout=30)  # the shell's start is not a tool call
        start = time.monotonic()
        for i in range(calls):
            result = workspace.run("cmd", COMMANDS[i % len(COMMANDS)], timeout=30)
            assert result.exit_code == 0, result
        bash_s = time.monotonic() - start
        start = time.monotonic()
        for i in range(edits):
            old, new = ("# edit", "# edit!") if i % 2 == 0 else ("# edit!", "# edit")
            if i == 0:
                workspace.run("cmd", "printf '# edit\\n' >> README.md", timeout=30)
            request = {"path": "README.md", "search": old, "replace": new, "context": 1}
            answer = workspace.tool(tools.HELPER, "edit", request, timeout=30)
            assert answer["ok"], answer
        edit_s = time.monotonic() - start
    finally:
        workspace.close()
    return {
        "bash_calls_per_s": round(calls / bash_s, 1),
        "edit_calls_per_s": round(edits / edit_s, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=60)
    parser.add_argument("--edits", type=int, default=10)
    parser.add_argument("--backend", default="docker", choices=["docker", "local"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        jsonl = build_tasks(Path(tmp) / "tasks")
        instance = next(i for i in load_instances(jsonl) if i.instance_id.startswith("textkit"))
        emulated = measure(instance, args.backend, False, args.calls, args.edits)
        real = measure(instance, args.backend, True, args.calls, args.edits)
    ratio = {k: round(real[k] / emulated[k], 1) for k in real}
    print(f"{'':<18}{'bash calls/s':>14}{'edit calls/s':>14}")
    for name, r in (("emulated", emulated), ("real shell", real)):
        print(f"{name:<18}{r['bash_calls_per_s']:>14}{r['edit_calls_per_s']:>14}")
    print(f"{'ratio':<18}{ratio['bash_calls_per_s']:>13}x{ratio['edit_calls_per_s']:>13}x")
    result = {"backend": args.backend, "emulated": emulated, "real_shell": real, "ratio": ratio}
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
