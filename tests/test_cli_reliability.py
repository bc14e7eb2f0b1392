"""The command line under hostile conditions: two writers on one run directory, a diverging
``train``, a checkpoint whose config lies about the network, write failures, bad data files
and bad flags.  Each failure must be a one-line message and exit status 1 (2 for usage), never
a traceback, and nothing finished may be damaged.
"""
from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from scoresde import _runs, checkpoint, cli
from scoresde.checkpoint import CheckpointError, load_checkpoint

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
SAMPLE = ["--steps", "4", "--dtype", "float64", "--block-size", "8", "--seed", "0", "--quiet"]


def run(*argv) -> int:
    return cli.main([str(a) for a in argv])


def _spawn(args: list, cwd: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "scoresde", *map(str, args)], cwd=cwd, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "gmm.pt"
    assert run("train", "--data", "gmm", "--out", path, "--steps", 20, "--batch-size", 64, "--hidden", 16,
               "--depth", 1, "--quiet") == 0
    return path


def _rewrite_config(src: Path, dst: Path, edit) -> Path:
    payload = torch.load(src, weights_only=True)
    config = json.loads(payload["config"])
    edit(config)
    torch.save({**payload, "config": json.dumps(config)}, dst)
    return dst


# ------------------------------------------------------------- one writer per run directory
def test_a_held_run_directory_refuses_a_second_writer(ckpt, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    with _runs.RunDirLock(out).acquire():             # another writer (this process) holds it
        assert run("sample", "--checkpoint", ckpt, "--out", out, "-n", 5, "--resume", *SAMPLE) == 1
        err = capsys.readouterr().err
        assert str(out) in err and f"pid {os.getpid()}" in err and "Traceback" not in err
        assert not (out / "run.json").exists() and not list(out.glob("shard-*")), "the refused writer wrote"
        # a simulated shard is a writer too
        assert run("sample", "--checkpoint", ckpt, "--out", out, "-n", 5, "--shard", "1/2", *SAMPLE) == 1
        assert f"pid {os.getpid()}" in capsys.readouterr().err
    assert run("sample", "--checkpoint", ckpt, "--out", out, "-n", 5, "--resume", *SAMPLE) == 0   # released


def test_simulated_shards_share_the_directory_but_not_a_shard(ckpt, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    with _runs.RunDirLock(out, shard=(0, 2)).acquire():   # shard 0/2 is running elsewhere
        assert run("sample", "--checkpoint", ckpt, "--out", out, "-n", 20, "--shard", "0/2", *SAMPLE) == 1
        err = capsys.readouterr().err
        assert "shard 0/2" in err and f"pid {os.getpid()}" in err
        assert run("sample", "--checkpoint", ckpt, "--out", out, "-n", 20, "--resume", *SAMPLE) == 1
        assert f"pid {os.getpid()}" in capsys.readouterr().err
        assert run("sample", "--checkpoint", ckpt, "--out", out, "-n", 20, "--shard", "1/2", *SAMPLE) == 0
    assert run("sample", "--checkpoint", ckpt, "--out", out, "-n", 20, "--shard", "0/2", *SAMPLE) == 0
    assert (out / "samples.npz").exists()


def test_a_lock_left_by_a_killed_writer_does_not_block(ckpt, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(         # what RunDirLock does, without importing torch
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
         "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'%d' % os.getpid()); print('held', flush=True); "
         "time.sleep(600)", str(out / _runs.LOCK_FILE)], env=ENV, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    assert run("sample", "--checkpoint", ckpt, "--out", out, "-n", 5, "--resume", *SAMPLE) == 1   # held
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert (out / _runs.LOCK_FILE).read_text() == str(holder.pid), "the dead holder's lock file stays behind"
    assert run("sample", "--checkpoint", ckpt, "--out", out, "-n", 5, "--resume", *SAMPLE) == 0


def test_without_os_locks_runs_still_work(ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(_runs, "fcntl", None)
    monkeypatch.setattr(_runs, "_warned_unlocked", False)
    out = tmp_path / "run"
    with pytest.warns(RuntimeWarning, match="not protected"):
        assert run("sample", "--checkpoint", ckpt, "--out", out, "-n", 5, *SAMPLE) == 0
    assert (out / "samples.npz").exists()


RACE = ["-n", 48, "--block-size", 8, "--dtype", "float64", "--seed", 3, "--quiet"]


@pytest.mark.slow      # two interpreter start-ups
def test_two_writers_started_together_exactly_one_proceeds(ckpt, tmp_path):
    """Two ``--resume`` runs with different --steps started 0.02 s apart on one directory."""
    out = tmp_path / "race"
    procs = {}
    for steps in (50, 10):
        procs[steps] = _spawn(["sample", "--checkpoint", ckpt, "--out", out, "--resume", "--steps", steps,
                               "--batch-size", 1, *RACE], tmp_path)
        time.sleep(0.02)
    done = {steps: (p.wait(timeout=300), p.stderr.read()) for steps, p in procs.items()}
    rcs = sorted(rc for rc, _ in done.values())
    assert rcs == [0, 1], done
    winner = next(s for s, (rc, _) in done.items() if rc == 0)
    loser_err = next(err for rc, err in done.values() if rc == 1)
    assert str(out) in loser_err and "pid " in loser_err and "Traceback" not in loser_err, loser_err
    assert json.loads((out / "run.json").read_text())["config"]["steps"] == winner
    # consistent: the merged samples are those of a clean run with the winner's settings
    ref = tmp_path / "ref"
    assert run("sample", "--checkpoint", ckpt, "--out", ref, "--steps", winner, "--batch-size", 48, *RACE) == 0
    assert (out / "samples.npz").read_bytes() == (ref / "samples.npz").read_bytes()


@pytest.mark.slow      # three interpreter start-ups
def test_concurrent_simulated_shards_agree_on_a_drawn_seed(ckpt, tmp_path):
    """Shards 0/2 and 1/2 (twice) started together without --seed: one seed is drawn and shared
    through run.json, the duplicate shard is refused, and the merge equals a single run."""
    out = tmp_path / "shards"
    argv = ["sample", "--checkpoint", ckpt, "--out", out, "-n", 48, "--block-size", 8, "--batch-size", 1,
            "--steps", 10, "--dtype", "float64", "--quiet"]
    procs = [_spawn([*argv, "--shard", s], tmp_path) for s in ("0/2", "1/2", "1/2")]
    done = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in done) == [0, 0, 1], done
    assert any(rc == 1 and "shard 1/2" in err and "already running" in err for rc, err in done), done
    seed = json.loads((out / "run.json").read_text())["config"]["seed"]
    ref = tmp_path / "ref"
    assert run(*argv[:4], ref, *argv[5:], "--batch-size", 48, "--seed", seed) == 0
    assert (out / "samples.npz").read_bytes() == (ref / "samples.npz").read_bytes()


# ------------------------------------------------------------------------ diverged training
def _all_finite(path: Path) -> bool:
    payload = torch.load(path, weights_only=True)
    return all(bool(torch.isfinite(v).all()) for key in ("state_dict", "raw_state_dict")
               for v in payload[key].values())


def test_diverged_training_exits_1_and_keeps_the_last_finite_checkpoint(tmp_path, capsys):
    out = tmp_path / "m.pt"
    common = ["train", "--data", "gmm", "--out", out, "--batch-size", 64, "--hidden", 16, "--depth", 1,
              "--quiet"]
    assert run(*common, "--steps", 5) == 0
    good = out.read_bytes()
    assert run(*common, "--steps", 60, "--lr", 1e6, "--overwrite") == 1
    err = capsys.readouterr().err
    assert "diverged at step" in err and "loss" in err and "Traceback" not in err, err
    assert out.read_bytes() == good, "a good checkpoint was overwritten"
    # with --save-every the last finite checkpoint is the one kept
    out2 = tmp_path / "m2.pt"
    assert run(*common[:4], out2, *common[5:], "--steps", 60, "--lr", 1e6, "--save-every", 2) == 1
    assert "diverged" in capsys.readouterr().err
    assert out2.exists() and _all_finite(out2)
    assert torch.load(out2, weights_only=True)["train_state"]["step"] < 60


# -------------------------------------------------------------------- lying checkpoint configs
def test_a_lying_config_is_refused_before_building_the_network(ckpt, tmp_path, monkeypatch):
    """The config names a net far larger than the stored tensors: refused from shapes alone,
    the network is only ever built on the meta device (no memory)."""
    real = checkpoint.build_net
    built = []

    def spy(config):
        built.append(torch.get_default_device().type)
        if torch.get_default_device().type != "meta":
            assert config["hidden"] < 1000, "a real network was built from a lying config"
        return real(config)

    monkeypatch.setattr(checkpoint, "build_net", spy)

    def lie(hidden, depth):
        def edit(cfg):
            cfg["net"].update(hidden=hidden, depth=depth)
        return edit

    big = _rewrite_config(ckpt, tmp_path / "big.pt", lie(6000, 12))
    with pytest.raises(CheckpointError, match=r"does not match the stored tensors.*hidden"):
        load_checkpoint(big)
    assert built and set(built) == {"meta"}
    huge = _rewrite_config(ckpt, tmp_path / "huge.pt", lie(200_000, 12))
    with pytest.raises(CheckpointError, match=r"net\.hidden"):
        load_checkpoint(huge)
    deep = _rewrite_config(ckpt, tmp_path / "deep.pt", lie(16, 10**9))
    with pytest.raises(CheckpointError, match=r"net\.depth"):
        load_checkpoint(deep)
    built.clear()
    load_checkpoint(ckpt)                                  # an honest one: meta check, then the real build
    assert built == ["meta", "cpu"]


@pytest.mark.parametrize("key, value", [
    ("net.dim", 0), ("net.hidden", True), ("net.emb_dim", 2.5), ("data.shape", [2, 10**9]),
    ("data.shape", [-1]), ("data.shape", [3]), ("sigma_data", float("inf")), ("sde.beta_max", float("nan")),
    ("net.channel_mults", [1] * 100), ("prediction", "bogus"),
])
def test_out_of_range_config_values_name_the_key(ckpt, tmp_path, key, value):
    def edit(cfg):
        head, _, tail = key.partition(".")
        if tail:
            cfg.setdefault(head, {})[tail] = value
        else:
            cfg[head] = value
    bad = tmp_path / "bad.pt"
    payload = torch.load(ckpt, weights_only=True)
    config = json.loads(payload["config"])
    edit(config)
    torch.save({**payload, "config": json.dumps(config)}, bad)   # json writes inf as Infinity
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        load_checkpoint(bad)


def test_unusable_sde_config_in_a_checkpoint_is_a_clean_error(ckpt, tmp_path, capsys):
    def edit(cfg):
        cfg["sde"]["T"] = 1e9
    bad = _rewrite_config(ckpt, tmp_path / "t.pt", edit)
    with pytest.raises(CheckpointError, match="sde"):
        load_checkpoint(bad)
    assert run("sample", "--checkpoint", bad, "--out", tmp_path / "o", "-n", 3, *SAMPLE) == 1
    err = capsys.readouterr().err
    assert str(bad) in err and "sde" in err and len(err.strip().splitlines()) == 1, err


# ------------------------------------------------------------------- write failures, bad inputs
@contextlib.contextmanager
def _file_size_limit():
    """Files of this process may not grow past 4 KiB (as under ``ulimit -f 4``); Python ignores
    SIGXFSZ, so a write beyond it fails with EFBIG ("File too large")."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


@pytest.mark.parametrize("command", ["sample", "train"])
def test_a_write_failure_is_one_line_and_exit_1(ckpt, tmp_path, capsys, command):
    if command == "sample":
        args = ["sample", "--checkpoint", ckpt, "--out", tmp_path / "o", *SAMPLE, "-n", 400, "--block-size", 400]
        target = tmp_path / "o" / "shard-00000000-00000399.npz"
    else:
        args = ["train", "--data", "gmm", "--out", tmp_path / "m.pt", "--steps", 2, "--hidden", 64, "--quiet"]
        target = tmp_path / "m.pt"
    with _file_size_limit():
        rc = run(*args)
    err = capsys.readouterr().err
    assert rc == 1 and "File too large" in err and str(target) in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not target.exists() and not list(target.parent.glob(".*.tmp-*")), "a partial file was left"


def test_bad_data_files_are_one_line_errors(ckpt, tmp_path, capsys):
    empty = tmp_path / "empty.npy"
    np.save(empty, np.zeros((0, 2), np.float32))
    npz = tmp_path / "d.npz"
    np.savez(npz, a=np.ones((4, 2), np.float32))
    for spec, words in ((empty, ["no samples"]), (f"{npz}:missing_key", ["missing_key", "'a'"])):
        for argv in (["likelihood", "--checkpoint", ckpt, "--out", tmp_path / "lk", "--data", spec, "--quiet"],
                     ["train", "--data", spec, "--out", tmp_path / "m.pt", "--steps", 2, "--quiet"]):
            assert run(*argv) == 1
            err = capsys.readouterr().err
            assert str(spec).split(":")[0] in err and all(w in err for w in words), err
            assert len(err.strip().splitlines()) == 1, err


def test_device_meta_is_refused(ckpt, tmp_path, capsys):
    assert run("sample", "--checkpoint", ckpt, "--out", tmp_path / "o", "-n", 3, "--device", "meta", *SAMPLE) == 1
    assert "--device" in capsys.readouterr().err
    assert run("train", "--data", "gmm", "--out", tmp_path / "m.pt", "--steps", 2, "--device", "nonsense",
               "--quiet") == 1
    assert "--device" in capsys.readouterr().err


# ------------------------------------------------------------------------------ bad flags
def test_bits_without_data_range_is_a_usage_error(ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run("likelihood", "--checkpoint", ckpt, "--out", tmp_path / "o", "--data", "gmm", "-n", 4, "--bits", 8)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--bits" in err and "--data-range" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_t_end_is_refused_at_parse_time(ckpt, tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exc:
        run("sample", "--checkpoint", ckpt, "--out", tmp_path / "o", "-n", 3, f"--t-end={value}")
    assert exc.value.code == 2
    assert "--t-end" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
