"""The agentic SWE environment: fix an issue in a repository with CWM's tools.

An episode: `reset(task)` starts a sandbox holding the task's repository at its base commit,
history scrubbed (envs.swe.workspace), and returns the system prompt (the tools) and the issue.
Each `step(reply)` runs the reply's one tool call (envs.swe.tools) and answers with its result
and a budget note (turns and tokens left). `submit` shows the patch back; the episode ends at
the next reply without a tool call, and the last submitted patch is scored in a fresh sandbox
(envs.swe.scoring): +1 resolved, 0 close to the oracle, -1 otherwise.

A reply with a malformed call (several calls, unknown tool, unclosed tag; or no call before a
submission) is a format error: reported back in the default mode, the end of the episode with
the failure reward in strict mode. The episode also ends when the env's own turn or token
budget or its deadline runs out: the last submission is then scored (or, with
`score_unsubmitted`, the repository's uncommitted changes), else the failure reward; the status
is "truncated". Every bash command has its own timeout. Sandbox failures raise (reset) or end
the episode with status env_error: reward unavailable, never a score. With `leak_check`, reset
also searches the agent's fresh workspace (files and every git object) for the hidden tests and
the oracle patch (workspace.find_leaks) and raises if it finds them: off by default, as it
reads the whole repository.

Tokens: the env cannot see the tokenizer, so it estimates (characters / 4) unless whoever runs
the rollout calls `env.observe_tokens(n)` before each step (it knows the exact count).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from envs.base import Environment, Message, StepResult, Task, hash_split, require_config
from envs.data import DataError
from envs.swe import tools
from envs.swe.instances import SWEInstance, instance_from_record, load_instances
from envs.swe.scoring import ScoreResult, harness_parser, score_patch
from envs.swe.workspace import SandboxSpec, Workspace, find_leaks, open_workspace
from sandbox.base import SandboxError

CHARS_PER_TOKEN = 4
SCORING_MARGIN_S = 120.0  # docker: the container outlives the episode and scoring by this

SYSTEM_PROMPT = """\
You are a software engineer working in a Linux sandbox with a git repository. Fix the issue \
you are given by changing the repository's code, then submit a patch.

Use exactly one tool per reply, written as:
<tool: NAME>
...
</tool>

Tools:
- bash: run a shell command (one persistent session: the working directory and exported \
variables carry over; no network).
<tool: bash>
grep -rn "def parse" .
</tool>
- edit: replace text that occurs exactly once in a file. The first line is the path.
<tool: edit>
path/to/file.py
<<<<<<< SEARCH
exact old lines
=======
new lines
>>>>>>> REPLACE
</tool>
- create: create a new file (the path must not exist, its directory must). The first line \
is the path, the rest is the content.
- submit: submit a patch file that starts with `diff`, e.g. after `git diff > /tmp/fix.patch`:
<tool: submit>
/tmp/fix.patch
</tool>
After submitting, reply without a tool call to finish (or keep working and submit again)."""

THINK_NOTE = """

You always reason before responding, using the following format:
<think>
your internal reasoning
</think>
your external response, with its tool call. Only the text after </think> is read for a call."""

HARBOR_PROMPT = """\
Your working directory is {repo_path}. Complete this task:

{problem}

No patch is needed: what you leave in the container is checked. When you are done, reply \
without a tool call."""

USER_PROMPT = """\
The repository is at {repo_path}. Resolve this issue:

{problem}"""


@dataclass
class SWEConfig:
    """Config of the `swe` environment.

    source: "builtin" (the tasks of envs.swe.build_tasks, built on first use into `tasks_dir`,
    default the cache), "jsonl" (this project's records, `path`; `test_path` for the held-out
    split, else a hashed `test_fraction` of `path`) or "swebench" (JSONL of SWE-bench / SWE-bench
    Verified / SWE-Gym records, read as envs.swe.sources says: images named as the harness names
    them, under `image_namespace` (None: locally built names) in `image_style` "swebench" or
    "swegym", for `image_arch`) or "swesmith" (JSONL of SWE-smith records: the bug patch on the
    instance's branch, the oracle its reverse), "r2e" (JSONL of R2E-Gym records: hidden tests
    in the image, graded by expected outcomes) or "harbor" (`path`: a directory of Harbor task
    directories, verified in the agent's container: envs/swe/harbor.py). See envs/swe/sources.py.
    backend: the sandbox ("local" or "docker"); `use_task_images` runs docker sandboxes in the
    instance's image when it names one (built with `build_tasks --images`), else the repository
    is copied into a `cwm-rl/host` container. `allow_unisolated`: let the local sandbox run
    without a layer it promises (bubblewrap, cgroups, the uid drop) instead of failing.
    Budgets: `max_turns` replies, `max_tokens` tokens of the whole episode (for the budget note
    and the end), `command_timeout_s` per tool call, `episode_timeout_s` wall clock.
    Reward: +reward_scale resolved; 0 if similarity >= similarity_threshold; else -reward_scale.
    """

    source: Literal["builtin", "jsonl", "swebench", "swesmith", "r2e", "harbor"] = "builtin"
    path: str | None = None
    test_path: str | None = None
    tasks_dir: str | None = None
    test_fraction: float = 0.2
    n_train: int | None = None
    n_test: int | None = None
    on_bad_line: Literal["skip", "error"] = "skip"
    default_test_cmd: str | None = None
    image_namespace: str | None = "swebench"
    image_style: Literal["swebench", "swegym"] = "swebench"
    image_arch: Literal["x86_64", "arm64"] = "x86_64"
    backend: Literal["local", "docker"] = "local"
    use_task_images: bool = True
    docker_host: str | None = None
    allow_unisolated: bool = False
    # per-episode sandbox limits: memory (None: 2048 MB for the builtin tasks, CWM's 12 GB for
    # real repositories), CPUs (docker's quota; None: unlimited), processes
    memory_mb: int | None = None
    cpus: float | None = 1.0
    max_processes: int = 128
    # the agent's bash is one long-lived shell per episode (background jobs, unexported
    # variables and aliases carry over); False: a fresh bash per call restoring cwd and exports
    real_shell: bool = True
    max_turns: int = 30
    max_tokens: int = 32768
    command_timeout_s: float = 60.0
    episode_timeout_s: float = 1800.0
    scoring_timeout_s: float = 300.0
    max_output_chars: int = 8000
    strict_format: bool = False
    score_unsubmitted: bool = False
    reward_scale: float = 1.0
    similarity_threshold: float = 0.5
    system_prompt: str | None = None  # replaces the default (which describes the tools)
    # reasoning mode (CWM's): a reply is <think>...</think> then the response; the tool call is
    # read from the text after </think> only (a call inside the reasoning is not run), and a
    # reply without </think> is a format error when `require_think`
    reasoning: bool = False
    require_think: bool = True
    leak_check: bool = False  # reset checks the workspace for the hidden tests and the oracle
    # before training, the first N instances of the data are validated (envs.swe.validate: gold
    # patch +1, empty patch unresolved, image present) and a failure refuses the run, naming
    # the instance. None: 3 for jsonl / swebench data, 0 for the builtin (verified when built)
    validate_first: int | None = None

    def __post_init__(self) -> None:
        if self.source != "builtin":
            require_config(
                self.path is not None, "path", f"is required when source is '{self.source}'"
            )
        require_config(0 < self.test_fraction < 1, "test_fraction", "must be in (0, 1)")
        for key in ("max_turns", "max_tokens", "max_output_chars", "max_processes"):
            require_config(getattr(self, key) >= 1, key, "must be >= 1")
        if self.memory_mb is None:
            self.memory_mb = 2048 if self.source == "builtin" else 12288
        require_config(self.memory_mb >= 128, "memory_mb", "must be >= 128")
        require_config(self.cpus is None or self.cpus > 0, "cpus", "must be > 0 (or None)")
        for key in ("command_timeout_s", "episode_timeout_s", "scoring_timeout_s"):
            require_config(getattr(self, key) > 0, key, "must be > 0")
        require_config(
            self.command_timeout_s < self.episode_timeout_s,
            "command_timeout_s",
            "must be shorter than episode_timeout_s",
        )
        require_config(self.reward_scale > 0, "reward_scale", "must be > 0")
        require_config(
            0 <= self.similarity_threshold <= 1, "similarity_threshold", "must be in [0, 1]"
        )
        for key in ("n_train", "n_test", "validate_first"):
            value = getattr(self, key)
            require_config(value is None or value >= 0, key, f"must be >= 0, got {value}")

    def sandbox_spec(self) -> SandboxSpec:
        return SandboxSpec(
            backend=self.backend,
            memory_mb=self.memory_mb,
            cpus=self.cpus,
            max_processes=self.max_processes,
            real_shell=self.real_shell,
            use_task_images=self.use_task_images,
            docker_host=self.docker_host,
            lifetime_s=self.episode_timeout_s + self.scoring_timeout_s + SCORING_MARGIN_S,
            allow_unisolated=self.allow_unisolated,
        )


class SWEEnv(Environment):
    """Multi-turn repository tasks with bash / edit / create / submit, scored by hidden tests."""

    name = "swe"
    config_cls = SWEConfig

    @classmethod
    def episode_seconds(cls, config: SWEConfig) -> float:
        # the agent's deadline (set before the sandbox starts), then scoring, which does not count
        # against it, and the scoring sandbox's own start
        return config.episode_timeout_s + config.scoring_timeout_s + SCORING_MARGIN_S

    def __init__(self, config: SWEConfig | Mapping | None = None) -> None:
        super().__init__(config)
        self.config: SWEConfig
        self.truncation_reward = -self.config.reward_scale  # read by the rollout at its limits
        self.tokens_used: int | None = None  # exact, from observe_tokens (else estimated)
        self._tasks: dict[str, list[Task]] | None = None
        self._instance: SWEInstance | None = None
        self._workspace: Workspace | None = None
        self._reset_state()

    def _reset_state(self) -> None:
        self._turns = 0
        self._chars = 0
        self._submission: str | None = None
        self._done = False
        self._deadline = 0.0
        self._info: dict = {"tool_calls": {}, "format_errors": 0}

    # -- tasks ------------------------------------------------------------------------------

    def load_tasks(self, split: str) -> list[Task]:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if self._tasks is None:
            self._tasks = self._build_tasks()
        return list(self._tasks[split])

    def _instances(self, path: str) -> list[SWEInstance]:
        config = self.config
        if config.source == "harbor":
            from envs.swe import harbor

            try:
                return [instance_from_record(r) for r in harbor.load_tasks(path)]
            except ValueError as e:
                raise DataError(str(e)) from None
        options = {}
        if config.source == "swebench":
            options = {
                "namespace": config.image_namespace,
                "style": config.image_style,
                "arch": config.image_arch,
            }
        instances = load_instances(
            path,
            default_test_cmd=config.default_test_cmd,
            on_bad_line=config.on_bad_line,
            record_format="native" if config.source in ("builtin", "jsonl") else config.source,
            **options,
        )
        if not instances:
            raise DataError(f"{path}: no usable SWE instances")
        for parser in sorted({i.log_parser for i in instances if i.log_parser is not None}):
            try:
                harness_parser(parser)
            except ValueError as e:
                raise DataError(f"{path}: {e}") from None
        return instances

    def instances(self) -> list[SWEInstance]:
        """Every instance of the configured data (`path`, then `test_path`), in file order."""
        config = self.config
        if config.source == "builtin":
            from envs.swe.build_tasks import ensure_tasks

            return self._instances(str(ensure_tasks(config.tasks_dir)))
        assert config.path is not None
        found = self._instances(config.path)
        if config.test_path is not None:
            found += self._instances(config.test_path)
        return found

    def _build_tasks(self) -> dict[str, list[Task]]:
        config = self.config
        instances = self.instances()
        self._validate(instances)
        by_split: dict[str, list[SWEInstance]] = {"train": [], "test": []}
        if config.test_path is not None:
            held_out = {i.instance_id: i for i in self._instances(config.test_path)}
            by_split["test"] = list(held_out.values())
            by_split["train"] = [i for i in instances if i.instance_id not in held_out]
        else:
            for instance in instances:
                by_split[hash_split(instance.instance_id, config.test_fraction)].append(instance)
        tasks = {}
        for split, chosen in by_split.items():
            cap = config.n_train if split == "train" else config.n_test
            chosen = chosen if cap is None else chosen[:cap]
            tasks[split] = [
                Task(id=f"swe-{i.instance_id}", env=self.name, payload=i.to_payload(), split=split)
                for i in chosen
            ]
        return tasks

    def _validate(self, instances: list[SWEInstance]) -> None:
        """Refuse data whose first instances do not validate (SWEConfig.validate_first)."""
        config = self.config
        n = config.validate_first
        if n is None:
            n = 0 if config.source == "builtin" else 3
        if n == 0:
            return
        from envs.swe.validate import check_instances

        spec = config.sandbox_spec()
        for check in check_instances(instances[:n], spec, timeout_s=config.scoring_timeout_s):
            if not check.ok:
                raise DataError(
                    f"SWE instance {check.instance_id} of {config.path or 'the builtin tasks'} "
                    f"failed validation before training: {check.reason} (check the data with "
                    f"`python -m launch.validate_swe {config.path or ''} --source "
                    f"{config.source}`; validate_first=0 skips this)"
                )

    # -- episode ----------------------------------------------------------------------------

    def prompt_messages(self, instance: SWEInstance, repo_path: str) -> list[Message]:
        system = self.config.system_prompt or (
            SYSTEM_PROMPT + THINK_NOTE if self.config.reasoning else SYSTEM_PROMPT
        )
        template = HARBOR_PROMPT if instance.verifier == "harbor" else USER_PROMPT
        user = template.format(repo_path=repo_path, problem=instance.problem_statement)
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]

    async def reset(self, task: Task) -> list[Message]:
        await self.close()
        self._reset_state()
        instance = SWEInstance.from_payload(task.payload)
        self._instance = instance
        self._deadline = time.monotonic() + self.config.episode_timeout_s
        spec = self.config.sandbox_spec()
        self._workspace = await asyncio.to_thread(
            open_workspace, instance, spec, scrub=instance.verifier is None
        )
        self._info.update({k: round(v, 4) for k, v in self._workspace.timings.items()})
        if self.config.leak_check:
            leaks = await asyncio.to_thread(find_leaks, self._workspace, instance)
            if leaks:
                await self._release_workspace()
                raise SandboxError(f"{instance.instance_id} leaks into the workspace: {leaks[:3]}")
        messages = self.prompt_messages(instance, self._workspace.repo_path)
        self._chars += sum(len(m["content"]) for m in messages)
        return messages

    def observe_tokens(self, used: int) -> None:
        self.tokens_used = used

    def _tokens_left(self) -> int:
        used = self.tokens_used
        if used is None:
            used = -(-self._chars // CHARS_PER_TOKEN)
        return self.config.max_tokens - used

    def _budget_note(self) -> str:
        turns_left = self.config.max_turns - self._turns
        return (
            f"\n\n[Budget: {turns_left} turns and about {max(self._tokens_left(), 0)} tokens left.]"
        )

    async def step(self, assistant_text: str) -> StepResult:
        if self._instance is None:
            raise RuntimeError("SWEEnv.step() called before reset()")
        if self._done or self._workspace is None:
            raise RuntimeError("SWEEnv.step() called after the episode ended; call reset()")
        self._turns += 1
        self._chars += len(assistant_text)
        response = assistant_text
        if self.config.reasoning:
            _, closed, response = assistant_text.rpartition("</think>")
            if not closed:
                if self.config.require_think:
                    return await self._format_error("no </think> closing the reasoning")
                response = assistant_text
        try:
            call = tools.parse_tool_call(response)
        except tools.FormatError as e:
            return await self._format_error(str(e))
        if call is None:
            if self._submission is not None or self._instance.verifier == "harbor":
                return await self._finish("submitted")
            return await self._format_error(
                "no tool call; use one tool per reply (<tool: NAME> ... </tool>)"
            )
        counts = self._info["tool_calls"]
        counts[call.name] = counts.get(call.name, 0) + 1
        try:
            content = await asyncio.to_thread(self._run_tool, call)
        except SandboxError as e:
            return self._env_error(f"sandbox failed during {call.name}: {e}")
        return await self._answer(call.name, content)

    async def _answer(self, tool_name: str, content: str) -> StepResult:
        """The tool's result with the budget note, or the end of the episode at a limit."""
        if self._turns >= self.config.max_turns:
            return await self._finish("max_turns")
        if time.monotonic() >= self._deadline - self.config.command_timeout_s:
            return await self._finish("deadline")
        content = content + self._budget_note()
        self._chars += len(content)
        if self._tokens_left() <= 0:
            return await self._finish("max_tokens")
        message: Message = {"role": "tool", "name": tool_name, "content": content}
        return StepResult(messages=[message], done=False, info=self._info)

    async def _format_error(self, why: str) -> StepResult:
        self._info["format_errors"] += 1
        if self.config.strict_format:
            self._done = True
            self._info["format_error"] = why
            return StepResult(
                messages=[], done=True, reward=-self.config.reward_scale, info=self._info
            )
        if self._turns >= self.config.max_turns:
            return await self._finish("max_turns")
        content = f"Format error: {why}." + self._budget_note()
        self._chars += len(content)
        return StepResult(
            messages=[{"role": "user", "content": content}], done=False, info=self._info
        )

    def _env_error(self, why: str) -> StepResult:
        self._done = True
        self._info["env_error"] = why
        return StepResult(messages=[], done=True, reward=None, status="env_error", info=self._info)

    def _timeout(self) -> float:
        """A tool call's timeout: the command timeout, cut short by the episode's deadline."""
        left = self._deadline - time.monotonic() - 1.0
        return max(1.0, min(self.config.command_timeout_s, left))

    def _run_tool(self, call: tools.ToolCall) -> str:
        """Run one tool call in the workspace; the text the agent sees (blocking)."""
        workspace = self._workspace
        assert workspace is not None
        config = self.config
        timeout = self._timeout()
        if call.name == "bash":
            if not call.body.strip():
                return "bash: empty command."
            result = workspace.run("cmd", call.body, timeout=timeout)
            output = tools.clip(result.stdout_text, config.max_output_chars)
            if result.timed_out:
                return (
                    f"{output}\n[The command timed out after {timeout:g} s and was killed. The "
                    f"bash session was restarted: the working directory is "
                    f"{workspace.repo_path} again and exported variables are reset.]"
                ).lstrip()
            if result.killed_reason is not None:
                output += f"\n[killed: {result.killed_reason} limit]"
            elif result.exit_code != 0:
                output += f"\n[exit code {result.exit_code}]"
            return output if output.strip() else "[no output]"
        try:
            if call.name == "edit":
                path, search, replace = tools.parse_edit(call.body)
                request = {"path": path, "search": search, "replace": replace}
                answer = workspace.tool(
                    tools.HELPER,
                    "edit",
                    {**request, "context": tools.CONTEXT_LINES},
                    timeout=timeout,
                )
            elif call.name == "create":
                path, content = tools.parse_create(call.body)
                answer = workspace.tool(
                    tools.HELPER, "create", {"path": path, "content": content}, timeout=timeout
                )
            else:
                return self._submit(tools.parse_submit(call.body), timeout)
        except ValueError as e:
            return str(e)
        return tools.clip(answer["message"], config.max_output_chars)

    def _submit(self, path: str, timeout: float) -> str:
        workspace = self._workspace
        assert workspace is not None
        request = {"path": path, "max_bytes": tools.MAX_PATCH_BYTES}
        answer = workspace.tool(tools.HELPER, "read_patch", request, timeout=timeout)
        if not answer["ok"]:
            return answer["message"]
        text = answer["text"]
        if not text.startswith("diff"):
            return (
                f"submit failed: {path} does not start with `diff` (make it with e.g. "
                "`git diff > /tmp/fix.patch`)."
            )
        self._submission = text
        shown = tools.clip(text, self.config.max_output_chars)
        return (
            f"Submitted {path}:\n{shown}\nReply without a tool call to finish, or keep working "
            "and submit again."
        )

    async def _finish(self, reason: str) -> StepResult:
        """End the episode: score the submission (or the working tree), else fail."""
        self._done = True
        config = self.config
        self._info["end"] = reason
        status = "ok" if reason == "submitted" else "truncated"
        if self._instance is not None and self._instance.verifier == "harbor":
            return await self._verify_in_place(status)  # the container is the answer
        patch = self._submission
        if patch is None and config.score_unsubmitted and self._workspace is not None:
            try:
                result = await asyncio.to_thread(
                    self._workspace.run, "cmd", "git diff", timeout=self._timeout()
                )
                patch = result.stdout_text if result.ok else None
            except SandboxError as e:
                return self._env_error(f"reading the working tree's diff failed: {e}")
        self._info["submitted"] = self._submission is not None
        if patch is None:
            return StepResult(
                messages=[], done=True, reward=-config.reward_scale, status=status, info=self._info
            )
        assert self._instance is not None
        await self._release_workspace()  # the agent's sandbox is not needed for scoring
        verdict: ScoreResult = await asyncio.to_thread(
            score_patch,
            self._instance,
            patch,
            config.sandbox_spec(),
            scale=config.reward_scale,
            threshold=config.similarity_threshold,
            timeout_s=config.scoring_timeout_s,
        )
        self._info.update(verdict.info())
        if verdict.status == "env_error":
            return StepResult(
                messages=[], done=True, reward=None, status="env_error", info=self._info
            )
        return StepResult(
            messages=[], done=True, reward=verdict.reward, status=status, info=self._info
        )

    async def _verify_in_place(self, status: str) -> StepResult:
        """Harbor: the task's tests run in the agent's own container (envs/swe/harbor.py)."""
        from envs.swe import harbor

        assert self._instance is not None and self._workspace is not None
        scale = self.config.reward_scale
        try:
            reward, log = await asyncio.to_thread(harbor.verify, self._workspace, self._instance)
        except SandboxError as e:
            return self._env_error(f"the Harbor verifier failed: {e}")
        finally:
            await self._release_workspace()
        resolved = reward is not None and reward >= 1.0
        self._info.update(
            resolved=resolved, verifier_reward=reward, integrity="in-place", log_tail=log[-2000:]
        )
        return StepResult(
            messages=[],
            done=True,
            reward=scale if resolved else -scale,
            status=status,
            info=self._info,
        )

    async def _release_workspace(self) -> None:
        workspace, self._workspace = self._workspace, None
        if workspace is not None:
            self._info.update(
                {f"agent_{k}": round(v, 4) for k, v in workspace.timings.items() if "exec" in k}
            )
            await asyncio.to_thread(workspace.close)

    async def close(self) -> None:
        await self._release_workspace()
