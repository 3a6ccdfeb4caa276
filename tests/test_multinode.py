"""More than one node: a Ray cluster of three nodes on this machine (ray.cluster_utils.Cluster:
a raylet, object store and agents per node; every server on 127.0.0.1), the learner on the head
(it offers the custom resource `learner_node`) and the rollout workers on two rollout nodes
(`rollout_node`), placed by the run config's `learner_resources` and `rollout.resources`: a run
with each weight-sync method (nothing listening beyond loopback meanwhile), a placement no node
can hold named before anything starts, a run through `ray job submit`, two learner ranks on two
nodes, and a rollout node killed mid-run, whose workers come back on the other one.

Why not `ray start` processes: Ray binds its servers to loopback only when a node's address is
127.0.0.1, and `ray start --address` then refuses to join a head (with
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) or rewrites 127.0.0.1 into the host's external address
(without it). Cluster starts the same processes without that check.

One cluster serves the module; the node-killing test runs last, as it leaves one rollout node."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import free_ports, init_local_ray, non_loopback_listeners
from rl_utils import TINY_RUN, run_in_thread

from rl.config import load_config
from rl.orchestrator import Orchestrator, placement_problem
from rl.schema import ConfigError

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PLACED = [
    "learner_resources.learner_node=1",
    "rollout.resources.rollout_node=1",
    "rollout.num_workers=2",
]
RUN = [*TINY_RUN, *PLACED, "steps=2", "eval.num_tasks=1", "checkpoint.export_hf=false"]
NODE = {"node_ip_address": "127.0.0.1", "num_cpus": 2, "object_store_memory": 256 * 2**20}


class Nodes:
    """The cluster, its dashboard, and the node ids of the learner and rollout nodes."""

    def __init__(self, cluster, dashboard: str, rollout: list):
        self.cluster, self.dashboard, self.rollout = cluster, dashboard, rollout
        self.learner_node = cluster.head_node.node_id
        self.rollout_nodes = {node.node_id for node in rollout}


def alive_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n["Alive"]]


def wait_for(condition, timeout: float = 120.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not met in {timeout} s")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def nodes():
    """The head (learner node, dashboard on 127.0.0.1) and two rollout nodes; the test process
    joins as a driver on the head. A local Ray instance of the session (ray_local) is shut down
    meanwhile and started again after."""
    import ray
    from ray._private.utils import write_ray_address
    from ray.cluster_utils import Cluster

    # the nodes inherit this environment, and a job's `python` is the first on their PATH
    path = os.environ["PATH"]
    os.environ["PATH"] = f"{BIN}{os.pathsep}{path}"
    local = ray.is_initialized()
    if local:
        ray.shutdown()
    # this cluster's own settings (the test's loopback cluster runs without authentication;
    # tests/test_ray_job.py submits to a head with token auth), put back afterwards
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",
                                            "RAY_USAGE_STATS_ENABLED")}  # fmt: skip
    for key in saved:
        os.environ.setdefault(key, {"RAY_AUTH_MODE": "disabled"}.get(key, "0"))
    # node addresses stay 127.0.0.1 (Ray reads the clusters flag at import: whether or not a
    # local instance of the session set it before, as a run's local_ray_options does)
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    temp_dir = tempfile.mkdtemp(prefix="cwmmn-", dir="/tmp")  # socket paths must be short
    dashboard, agent = free_ports(2)  # the defaults may be held by another Ray instance here
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            **NODE, "resources": {"learner_node": 2}, "temp_dir": temp_dir,
            "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": dashboard,
            "dashboard_agent_listen_port": agent,
            # a dead node is declared dead after ~2 s (default ~15 s): its actors fail over sooner
            "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 2},
        },
    )  # fmt: skip
    try:
        # a job's driver finds its cluster through the head's temp dir (Cluster writes the file to
        # /tmp/ray alone; without it the driver joins whichever Ray instance of this host it sees)
        write_ray_address(cluster.address, temp_dir)
        # a temp dir per node, as each has its disk: nodes sharing one would share the runtime
        # environments' files (one node's set-up of a job's working dir deletes another's)
        rollout = [
            cluster.add_node(**NODE, resources={"rollout_node": 2}, temp_dir=f"{temp_dir}/{i}")
            for i in (1, 2)
        ]
        ray.init(
            address=cluster.address,
            _node_ip_address="127.0.0.1",
            log_to_driver=False,
            runtime_env={"env_vars": {"CWM_RL_TEST_THREADS": "1"}},
        )
        cluster.wait_for_nodes()
        yield Nodes(cluster, f"http://127.0.0.1:{dashboard}", rollout)
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
        os.environ["PATH"] = path
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if local:
            init_local_ray()


def actors_started(nodes: Nodes, run) -> dict[str, list]:
    """Run `run()`; returns the Learner and RolloutWorker actors started meanwhile (live or dead,
    as Ray's state API keeps them: their node ids)."""
    from ray.util.state import list_actors

    def listed() -> dict[str, dict]:
        return {
            a.actor_id: a
            for cls in ("Learner", "RolloutWorker")
            for a in list_actors(
                address=nodes.cluster.address, filters=[("class_name", "=", cls)], limit=10_000
            )
        }

    before = listed()
    run()
    new = [a for i, a in listed().items() if i not in before]
    return {cls: [a for a in new if a.class_name == cls] for cls in ("Learner", "RolloutWorker")}


def rows(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(x) for x in (run_dir / name).read_text().splitlines() if x.strip()]


@pytest.mark.parametrize("method", ["collective", "object_store"])
def test_learner_and_workers_run_on_their_nodes(nodes, tmp_path, method):
    """The learner on the learner node, the workers on the rollout nodes; the weights cross
    nodes by gloo broadcast or the object store, and the run completes its steps. While it runs,
    nothing listens beyond loopback: not the nodes' processes (GCS, raylets, agents, dashboard,
    actors), not the driver, not the learner's weight-sync store."""
    import psutil

    cfg = load_config(None, [*RUN, f"weight_sync.method={method}"])
    orch = Orchestrator(cfg, tmp_path / method)
    seen: dict = {}

    def run_and_look() -> None:
        thread, box = run_in_thread(orch)
        collective = method == "collective"
        wait_for(
            lambda: (
                (orch.step >= 1 and (orch.weights.group_ready or not collective))
                or not thread.is_alive()
            ),
            300,
            "the first weight update",
        )
        # the nodes' processes are this one's children (Cluster starts them), the actors theirs
        seen["pids"] = [os.getpid(), *(c.pid for c in psutil.Process().children(recursive=True))]
        seen["exposed"] = non_loopback_listeners(seen["pids"])
        seen["during_the_run"] = thread.is_alive()
        thread.join(300)
        assert not thread.is_alive() and "error" not in box, box.get("error")

    started = actors_started(nodes, run_and_look)
    assert [a.node_id for a in started["Learner"]] == [nodes.learner_node]
    workers = started["RolloutWorker"]
    assert len(workers) == 2 and {a.node_id for a in workers} <= nodes.rollout_nodes
    steps = [r for r in rows(tmp_path / method) if "train/loss" in r]
    assert len(steps) == 2 and steps[-1]["policy_version"] == 2
    assert steps[-1]["faults/worker_restarts"] == 0
    assert seen["during_the_run"] and len(seen["pids"]) > 10
    assert not seen["exposed"], "\n".join(seen["exposed"])


def test_placement_problems_name_the_key_and_what_the_nodes_offer():
    learner = {"CPU": 2.0, "learner_node": 2.0, "node:127.0.0.1": 1.0, "memory": 1e9}
    rollout = {"CPU": 2.0, "rollout_node": 2.0}
    cfg = load_config(None, RUN)
    assert placement_problem(cfg, [learner, rollout]) is None
    problem = placement_problem(cfg, [rollout, rollout])
    assert "key 'learner_resources'" in problem and "no node" in problem
    assert "[{'rollout_node': 2.0}, {'rollout_node': 2.0}]" in problem  # custom ones alone
    problem = placement_problem(
        load_config(None, [*RUN, "rollout.num_workers=3"]), [learner, rollout]
    )
    assert "key 'rollout.resources'" in problem and "x3" in problem and "offers 2" in problem
    assert placement_problem(load_config(None, TINY_RUN), []) is None  # nothing asked for


def test_actors_no_node_can_hold_fail_before_anything_starts(nodes, tmp_path):
    """A resource no node offers (a typo, a node missing) is named at start, not an actor left
    pending forever."""
    cfg = load_config(None, [*TINY_RUN, "rollout.resources.rollout_nod=1"])
    with pytest.raises(ConfigError, match="rollout.resources.*rollout_nod.*no node"):
        Orchestrator(cfg, tmp_path / "typo").start()
    cfg = load_config(None, [*RUN, "rollout.num_workers=5"])  # 2 + 2 slots
    with pytest.raises(ConfigError, match="rollout.resources.*rollout_node.*offers 4"):
        Orchestrator(cfg, tmp_path / "many").start()


def test_ray_job_submit_to_the_cluster(nodes, tmp_path):
    """`ray job submit` to the head's dashboard (127.0.0.1): the job's driver places its learner
    and workers by the config; the working dir reaches every node."""
    run_dir = tmp_path / "job_run"
    cmd = [
        str(BIN / "ray"), "job", "submit", "--address", nodes.dashboard,
        "--working-dir", str(REPO), "--", "python", "-m", "launch.train", "configs/smoke.yaml",
        *PLACED, "steps=2", "groups_per_step=2", "group_size=2", "rollout.max_new_tokens=4",
        "eval.num_tasks=1", "checkpoint.export_hf=false", "progress=false",
        f"--run-dir={run_dir}",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = None

    def submit() -> None:
        nonlocal out
        for _ in range(60):  # the job agent may take a few seconds more than the node
            out = subprocess.run(
                cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path
            )
            if out.returncode == 0 or not any(
                m in out.stderr for m in ("No available agent", "Failed to connect", "Connection")
            ):
                return
            time.sleep(2)

    started = actors_started(nodes, submit)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "succeeded" in out.stdout
    assert sum("train/loss" in r for r in rows(run_dir)) == 2
    assert [a.node_id for a in started["Learner"]] == [nodes.learner_node]
    workers = started["RolloutWorker"]
    assert len(workers) == 2 and {a.node_id for a in workers} <= nodes.rollout_nodes


def test_learner_ranks_on_two_nodes_train_as_one(nodes):
    """Two FSDP ranks, one per rollout node (each asks for a node's whole rollout_node): rank 0
    publishes an address on its node, rank 1 joins it from the other, and they take a step
    together, the same as one process."""
    import ray
    from ray.util.state import get_actor
    from test_learner import TINY, batch_from, config

    from rl.learner import Learner, start_learners

    cfg = config(micro_batch_tokens=40)
    single = Learner(cfg, TINY)
    batch = batch_from(single)
    learners = start_learners(cfg, TINY, world_size=2, resources={"rollout_node": 2})
    try:
        where = [get_actor(a._actor_id.hex(), address=nodes.cluster.address) for a in learners]
        metrics = ray.get([a.train_step.remote(batch) for a in learners])
    finally:
        ray.get([a.shutdown.remote() for a in learners])
        for a in learners:
            ray.kill(a)
    assert {a.node_id for a in where} == nodes.rollout_nodes  # one rank on each
    assert abs(metrics[0]["loss"] - single.train_step(batch)["loss"]) < 1e-6
    assert metrics[0]["loss"] == metrics[1]["loss"]


def test_a_rollout_node_killed_mid_run_loses_nothing(nodes, tmp_path):
    """A rollout node killed (SIGKILL to its raylet and agents) after the first step: its
    workers are replaced on the other rollout node, and every step trains on the groups it
    drew, none lost or repeated. Runs last: the cluster keeps one rollout node."""
    from ray.util.state import get_actor

    cfg = load_config(None, [*RUN, "steps=3", "weight_sync.method=collective"])
    orch = Orchestrator(cfg, tmp_path / "kill")
    box: dict = {}

    def kill_a_rollout_node() -> None:
        thread, result = run_in_thread(orch)
        wait_for(lambda: orch.step >= 1 or not thread.is_alive(), 300, "the first step")
        box["before"] = {w._actor_id.hex() for w in orch.workers}
        worker = orch.workers[0]._actor_id.hex()
        box["victim"] = get_actor(worker, address=nodes.cluster.address).node_id
        (victim,) = [node for node in nodes.rollout if node.node_id == box["victim"]]
        nodes.cluster.remove_node(victim, allow_graceful=False)  # SIGKILL, raylet first
        thread.join(300)
        assert not thread.is_alive()
        box.update(result)

    started = actors_started(nodes, kill_a_rollout_node)
    assert "error" not in box, box.get("error")
    steps = [r for r in rows(tmp_path / "kill") if "time/step_s" in r]
    assert len(steps) == 3 and all("train/loss" in r for r in steps)
    # the run's own count (a death noticed after the last step's row, at the final sync or
    # the evaluation, is not in that row)
    restarts = orch.faults["worker_restarts"]
    assert restarts >= 1
    trained = [g for r in rows(tmp_path / "kill", "trained.jsonl") for g in r["groups"]]
    assert [g.split("-")[0] for g in trained] == [f"g{i}" for i in range(3 * 2)]
    (survivor,) = nodes.rollout_nodes - {box["victim"]}
    replacements = [a for a in started["RolloutWorker"] if a.actor_id not in box["before"]]
    assert len(replacements) == restarts
    assert {a.node_id for a in replacements} == {survivor}
