"""Weights & Biases as the run log's mirror (rl/wandb_log.py): a tiny run in offline mode, its
.wandb file read back record by record (wandb's protobuf Record, LevelDB-log framing) and compared
with what metrics.jsonl, TensorBoard, config.yaml, provenance.json and reward_curve.png hold."""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import zlib
from pathlib import Path

import pytest
import yaml
from conftest import non_loopback_listeners, require
from rl_utils import TINY_RUN

from rl import wandb_log
from rl.config import load_config
from rl.schema import ConfigError

OFFLINE = ["logging.wandb.project=x", "logging.wandb.mode=offline"]


def require_wandb() -> None:
    require(
        "wandb",
        wandb_log.installed(),
        f"the wandb extra is not installed: {wandb_log.INSTALL_HINT}",
    )


# -- reading a .wandb file -------------------------------------------------------------------------

BLOCK, HEADER = 32768, 7  # LevelDB log framing: 32 KiB blocks of records with 7-byte headers
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> list:
    """Every Record (wandb.proto.wandb_internal_pb2) of a .wandb file, checksums verified."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:HEADER])
    assert (ident, magic) == (b":W&B", 0xBEE1), "not a .wandb file"
    records, pos, payload = [], HEADER, b""
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's zero-filled trailer
            pos += BLOCK - pos % BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0:  # zero padding to the end of the block
            pos += BLOCK - pos % BLOCK
            continue
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, "corrupt record"
        payload = chunk if kind in (FULL, FIRST) else payload + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            records.append(record)
    return records


def history_rows(records: list) -> dict[int, dict]:
    """step -> the logged row (a nested key like reward_curve.path becomes a nested dict)."""
    rows = {}
    for r in records:
        if r.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in r.history.item:
            keys = [item.key] if item.key else list(item.nested_key)
            node = row
            for k in keys[:-1]:
                node = node.setdefault(k, {})
            node[keys[-1]] = json.loads(item.value_json)
        rows[row["_step"]] = row
    return rows


def tensorboard_scalars(directory: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


# -- a run -----------------------------------------------------------------------------------------


@pytest.mark.slow  # ~70 s on 2 busy cores
def test_an_offline_run_logs_what_the_run_log_holds(ray_local, tmp_path, monkeypatch):
    require_wandb()
    from rl.orchestrator import Orchestrator

    home = tmp_path / "home"  # wandb's default places (~/.cache/wandb, ~/.config/wandb)
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for key in ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "WANDB_CACHE_DIR", "WANDB_DIR", "WANDB_MODE"):
        monkeypatch.delenv(key, raising=False)
    run_dir = tmp_path / "run"
    quick = ["steps=2", "eval.num_tasks=2", "checkpoint.export_hf=false"]
    Orchestrator(load_config(None, [*TINY_RUN, *quick, *OFFLINE]), run_dir).run()

    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, offline
    (wandb_file,) = offline[0].glob("*.wandb")
    records = wandb_records(wandb_file)
    assert not [p for p in home.rglob("*") if "wandb" in p.name], "wandb wrote outside the run"

    # the resolved config and the provenance, as config.yaml and provenance.json hold them
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.project == "x" and run.display_name == "run"
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config.pop("provenance") == json.loads((run_dir / "provenance.json").read_text())
    config.pop("_wandb")
    assert config == yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["logging"]["wandb"]["mode"] == "offline" and config["steps"] == 2

    # every metrics.jsonl row's finite numbers at its step (rows of one step merged), and so
    # TensorBoard's scalars
    expected: dict[int, dict] = {}
    for row in (json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()):
        step = row.pop("step")
        expected.setdefault(step, {}).update(
            {k: v for k, v in row.items() if isinstance(v, int | float) and math.isfinite(v)}
        )
    history = history_rows(records)
    assert sorted(history) == sorted(expected) == [0, 1, 2]
    assert any("train/loss" in expected[s] for s in history)
    board = tensorboard_scalars(run_dir / "tensorboard")
    for step, row in history.items():
        logged = {k: v for k, v in row.items() if not k.startswith("_") and k != "reward_curve"}
        assert logged == expected[step], step
        for key, value in logged.items():
            assert board[key][step] == pytest.approx(value, rel=1e-6, abs=1e-6), (key, step)
    assert sorted(board) == sorted({k for row in expected.values() for k in row})

    # the reward curve, at the last step: the very PNG of the run dir
    image = history[2]["reward_curve"]
    assert image["_type"] == "image-file"
    logged_png = (offline[0] / "files" / image["path"]).read_bytes()
    assert logged_png == (run_dir / "reward_curve.png").read_bytes()
    assert image["sha256"] == hashlib.sha256(logged_png).hexdigest()
    assert [r for r in records if r.WhichOneof("record_type") == "exit"][0].exit.exit_code == 0


# -- the service -----------------------------------------------------------------------------------


def wandb_processes() -> set[int]:
    """This process's descendants run from wandb's package (wandb-core, its system monitor); not
    Ray's, which a session's Ray instance may start meanwhile."""
    found, todo = set(), [os.getpid()]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:  # gone meanwhile
                continue
            todo += children
            for child in children:
                try:
                    if "/wandb/" in os.readlink(f"/proc/{child}/exe"):
                        found.add(child)
                except OSError:
                    continue
    return found


def test_wandb_listens_on_no_network_address_and_leaves_no_process(tmp_path, monkeypatch):
    require_wandb()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert wandb_processes() == set()
    cfg = wandb_log.WandbConfig(project="x", mode="offline")
    log = wandb_log.WandbLog(cfg, tmp_path / "run", {"steps": 1}, {"git_commit": None})
    log.metrics(1, {"reward/mean": 0.5})
    service = wandb_processes()
    assert service, "wandb started no service process"
    assert non_loopback_listeners(service) == []
    log.close()
    assert wandb_processes() == set(), "a wandb process outlived the run"


def test_a_failed_run_is_marked_failed_on_wandb(tmp_path):
    """The run-log layer alone: rows and the reward curve, then a close after an exception."""
    require_wandb()
    from rl.runlog import RunLog

    log = RunLog(tmp_path / "run", tensorboard=False)
    log.wandb = wandb_log.WandbLog(
        wandb_log.WandbConfig(project="x", mode="offline"), log.dir, {"steps": 2}, {}
    )
    log.metrics(1, {"reward/mean": 0.25, "health/error": "text", "train/kl": math.nan})
    log.metrics(2, {"reward/mean": 0.5})
    log.plot_rewards()
    log.close(failed=True)
    (wandb_file,) = (log.dir / "wandb").glob("offline-run-*/*.wandb")
    records = wandb_records(wandb_file)
    history = history_rows(records)
    assert [history[s]["reward/mean"] for s in (1, 2)] == [0.25, 0.5]
    assert "health/error" not in history[1] and "train/kl" not in history[1]  # as TensorBoard
    assert history[2]["reward_curve"]["_type"] == "image-file"
    assert [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"] == [1]


# -- the config ------------------------------------------------------------------------------------


def test_wandb_section_is_optional_and_validated():
    assert load_config(None, TINY_RUN).logging.wandb is None
    require_wandb()
    section = load_config(None, [*TINY_RUN, "logging.wandb.mode=offline"]).logging.wandb
    assert (section.project, section.entity, section.mode) == ("cwm-rl", None, "offline")


def test_wandb_set_but_not_installed_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb fails, as when not installed
    with pytest.raises(ConfigError, match=r"logging\.wandb.*pip install '\.\[wandb\]'"):
        load_config(None, [*TINY_RUN, *OFFLINE])
    # mode disabled needs no package
    assert load_config(None, [*TINY_RUN, "logging.wandb.mode=disabled"]).logging.wandb
