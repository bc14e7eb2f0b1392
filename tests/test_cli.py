"""The ``scoresde`` command: train / sample / likelihood / validate, checkpoints, and long-run
fault tolerance: seeds, bad checkpoints and output paths, interrupted and resumed runs (the
command-line rows of docs/reliability.md).

Most commands run in-process (``scoresde.cli.main``); the interruption tests kill a real
``python -m scoresde`` subprocess, and the distributed test launches two gloo processes with
``python -m torch.distributed.run``.  Every comparison of outputs is bitwise (file bytes).
"""
from __future__ import annotations

import json
import os
import pickle
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import scoresde
from scoresde import cli
from scoresde.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
SAMPLE = ["--steps", "4", "--dtype", "float64", "--block-size", "8", "--seed", "0", "--quiet"]


def run(*argv) -> int:
    return cli.main([str(a) for a in argv])


def files(folder: Path, pattern: str = "*") -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob(pattern)) if p.is_file()}


def shards(folder: Path) -> dict[str, bytes]:
    """The finished shard files (not ``*.corrupt``)."""
    return {k: v for k, v in files(folder, "shard-*").items() if k.endswith((".npz", ".jsonl"))}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny model trained for a few steps on the 2-D Gaussian mixture (about a second)."""
    path = tmp_path_factory.mktemp("model") / "gmm.pt"
    rc = run("train", "--data", "gmm", "--out", path, "--steps", 60, "--batch-size", 128, "--hidden", 32,
             "--depth", 1, "--weighting", "likelihood", "--quiet")
    assert rc == 0 and path.is_file()
    return path


@pytest.fixture(scope="module")
def reference(ckpt, tmp_path_factory) -> Path:
    """An uninterrupted single-process sample run: N=37, batch 64."""
    out = tmp_path_factory.mktemp("ref") / "run"
    assert run("sample", "--checkpoint", ckpt, "--out", out, "-n", 37, "--batch-size", 64, *SAMPLE) == 0
    return out


# ------------------------------------------------------------------ checkpoints
def test_train_writes_a_loadable_checkpoint(ckpt):
    model, cfg = load_checkpoint(ckpt)
    assert isinstance(model, scoresde.ScoreModel) and model.prediction.value == "eps"
    assert cfg["net"]["class"] == "MLPScoreNet" and cfg["sde"]["class"] == "VPSDE"
    assert cfg["data"]["shape"] == [2] and cfg["train"]["weighting"] == "likelihood"
    assert cfg["weights_used"] == "ema"
    raw, cfg_raw = load_checkpoint(ckpt, weights="raw")
    assert cfg_raw["weights_used"] == "raw"
    assert not all(torch.equal(a, b) for a, b in zip(model.net.state_dict().values(), raw.net.state_dict().values()))
    assert not any(p.name.startswith(".") for p in ckpt.parent.iterdir()), "temporary file left behind"
    x = torch.randn(3, 2)
    assert model.eps(x, 0.5).shape == (3, 2)


def test_missing_checkpoint_is_an_error_naming_the_path(tmp_path, capsys):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(missing)
    assert run("sample", "--checkpoint", missing, "--out", tmp_path / "o", "-n", 3, "--quiet") == 1
    err = capsys.readouterr().err
    assert "FileNotFoundError" in err and str(missing) in err


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_never_executes(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    raw = tmp_path / "raw.pt"
    with open(raw, "wb") as fh:
        pickle.dump({"format": "scoresde-checkpoint", "payload": _Evil(marker)}, fh)
    zipped = tmp_path / "zip.pt"
    torch.save({"format": "scoresde-checkpoint", "state_dict": {}, "payload": _Evil(marker)}, zipped)
    for path in (raw, zipped):
        with pytest.raises(CheckpointError, match="nothing was executed"):
            load_checkpoint(path)
        assert run("sample", "--checkpoint", path, "--out", tmp_path / f"o-{path.stem}", "-n", 3, "--quiet") == 1
        assert "cannot be loaded" in capsys.readouterr().err
    assert not marker.exists(), "the pickle payload ran"


def test_truncated_and_mismatched_checkpoints(ckpt, tmp_path):
    data = ckpt.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated.*sha256="):
        load_checkpoint(cut)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="truncated, corrupt"):
        load_checkpoint(junk)
    payload = torch.load(ckpt, weights_only=True)
    sd = dict(payload["state_dict"])
    dropped = sorted(sd)[0]
    del sd[dropped]
    sd["extra.weight"] = torch.zeros(1)
    bad = tmp_path / "keys.pt"
    torch.save({**payload, "state_dict": sd}, bad)
    with pytest.raises(CheckpointError, match=rf"missing keys \['{dropped}'\].*unexpected keys \['extra.weight'\]"):
        load_checkpoint(bad)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(CheckpointError, match="not a scoresde checkpoint"):
        load_checkpoint(other)


def test_save_checkpoint_round_trip(tmp_path):
    net = scoresde.MLPScoreNet(2, hidden=8, depth=1)
    sde = scoresde.VESDE(0.02, 20.0)
    save_checkpoint(tmp_path / "m.pt", net, sde, "x0", time_input="log_snr", extra={"data": {"shape": [2]}})
    model, cfg = load_checkpoint(tmp_path / "m.pt")
    assert model.prediction.value == "x0" and model.time_input == "log_snr"
    assert isinstance(model.sde, scoresde.VESDE) and model.sde.sigma_max == 20.0
    assert cfg["weights_used"] == "raw" and not model.net.training
    for a, b in zip(net.state_dict().values(), model.net.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(CheckpointError, match="no EMA"):
        load_checkpoint(tmp_path / "m.pt", weights="ema")


# ----------------------------------------------------------------- determinism
def test_sample_bitwise_independent_of_batch_size(ckpt, reference, tmp_path):
    """N=37, float64: batch sizes 1 and 5 give the same shard and merged bytes as 64."""
    for b in (1, 5):
        out = tmp_path / f"b{b}"
        assert run("sample", "--checkpoint", ckpt, "--out", out, "-n", 37, "--batch-size", b, *SAMPLE) == 0
        assert shards(out) == shards(reference)
        assert (out / "samples.npz").read_bytes() == (reference / "samples.npz").read_bytes()
    with np.load(reference / "samples.npz") as z:
        assert z["x"].shape == (37, 2) and z["x"].dtype == np.float64 and np.isfinite(z["x"]).all()
        assert np.array_equal(z["index"], np.arange(37)) and (z["status"] == "success").all()
        assert (z["nfe"] == 4).all()
    summary = json.loads((reference / "summary.json").read_text())
    assert summary["n"] == 37 and summary["nonfinite"] == 0 and summary["nfe_max"] == 4
    try:
        import matplotlib  # noqa: F401  (the plot extra; CI installs only the test extra)
        assert (reference / "samples.png").stat().st_size > 1000
    except ImportError:
        assert not (reference / "samples.png").exists()
    progress = json.loads((reference / "progress.json").read_text())
    assert progress["status"] == "done" and progress["done"] == progress["total"] == 37
    assert {"units_per_s", "eta_s", "mean_nfe", "nonfinite", "elapsed_s"} <= set(progress)
    manifest = json.loads((reference / "run.json").read_text())
    assert manifest["config"]["steps"] == 4 and len(manifest["config_hash"]) == 64
    assert {"torch", "scoresde", "git_sha"} <= set(manifest["provenance"])


def test_stochastic_and_adaptive_methods_are_batch_independent(ckpt, tmp_path):
    for method, extra in (("euler_maruyama", []), ("pf_ode", ["--option", "rtol=1e-4", "--option", "atol=1e-4"])):
        outs = []
        for b in (1, 64):
            out = tmp_path / f"{method}-{b}"
            args = ["sample", "--checkpoint", ckpt, "--out", out, "-n", 6, "--batch-size", b, "--method", method,
                    "--steps", 6, "--dtype", "float64", "--block-size", 4, "--seed", 2, "--quiet", *extra]
            assert run(*args) == 0
            outs.append((out / "samples.npz").read_bytes())
        assert outs[0] == outs[1], method


def test_simulated_shards_merge_into_the_single_run(ckpt, reference, tmp_path):
    out = tmp_path / "s3"
    for i in range(3):
        rc = run("sample", "--checkpoint", ckpt, "--out", out, "-n", 37, "--batch-size", 3, "--shard", f"{i}/3",
                 *SAMPLE)
        assert rc == 0
        assert (out / "samples.npz").exists() == (i == 2)
    assert shards(out) == shards(reference)
    assert (out / "samples.npz").read_bytes() == (reference / "samples.npz").read_bytes()
    # a run started with S=2 and resumed with S=1: block ownership is recomputed from the indices
    out2 = tmp_path / "s2"
    assert run("sample", "--checkpoint", ckpt, "--out", out2, "-n", 37, "--shard", "1/2", *SAMPLE) == 0
    assert 0 < len(shards(out2)) < len(shards(reference))
    assert run("sample", "--checkpoint", ckpt, "--out", out2, "-n", 37, "--resume", *SAMPLE) == 0
    assert (out2 / "samples.npz").read_bytes() == (reference / "samples.npz").read_bytes()


def test_likelihood_bitwise_and_summary(ckpt, tmp_path):
    outs = {}
    for b in (1, 5, 64):
        out = tmp_path / f"lk{b}"
        rc = run("likelihood", "--checkpoint", ckpt, "--out", out, "--data", "gmm", "-n", 37, "--block-size", 10,
                 "--batch-size", b, "--dtype", "float64", "--method", "rk4", "--ode-steps", 6, "--seed", 3, "--trace",
                 "hutchinson", "--probes", 2, "--quiet")
        assert rc == 0
        outs[b] = out
        assert shards(out) == shards(outs[1]) and (out / "likelihood.jsonl").read_bytes() == \
            (outs[1] / "likelihood.jsonl").read_bytes()
    rows = [json.loads(line) for line in (outs[1] / "likelihood.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(37))
    assert set(rows[0]) == {"index", "log_prob", "bits_per_dim", "nfe", "status"}
    lp = np.array([r["log_prob"] for r in rows])
    bpd = np.array([r["bits_per_dim"] for r in rows])
    np.testing.assert_allclose(bpd, -lp / (2 * np.log(2)), rtol=1e-12)
    s = json.loads((outs[1] / "summary.json").read_text())
    assert s["n"] == 37 and s["failed"] == 0 and s["trace"] == "hutchinson"
    np.testing.assert_allclose(s["bits_per_dim_mean"], bpd.mean(), rtol=1e-12)
    np.testing.assert_allclose(s["bits_per_dim_stderr"], bpd.std(ddof=1) / np.sqrt(37), rtol=1e-10)
    assert "exact_nll_mean" in s and "nll_minus_exact_mean" in s           # gmm has an exact density


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "likelihood.jsonl").read_text().splitlines()]


def _values(out: Path) -> list[tuple]:
    """Per point: index, log_prob, bits_per_dim, status (compared as Python floats: bitwise)."""
    return [(r["index"], r["log_prob"], r["bits_per_dim"], r["status"]) for r in _rows(out)]


def _adaptive(ckpt, dtype: str) -> list:
    """dopri5 (the default) at rtol = atol = 1e-4; --max-steps 20 stops the slower points
    (measured: 3 of the 9 in float64, 2 in float32), which are recorded, not lost."""
    return ["likelihood", "--checkpoint", ckpt, "--data", "gmm", "-n", 9, "--dtype", dtype, "--seed", 0,
            "--rtol", "1e-4", "--atol", "1e-4", "--max-steps", 20, "--on-failure", "record", "--quiet"]


def test_likelihood_adaptive_per_sample_is_layout_independent(ckpt, tmp_path):
    """dopri5 solves a block of points in one call with per-sample step control: each point's
    log_prob is bitwise the same (float64) whether solved alone (--batch-size 1), 3 per call,
    in blocks of 4 over 3 shards, or in a run started as one shard and resumed; failed points
    carry the same status in every layout."""
    lk = _adaptive(ckpt, "float64")
    solo, batched = tmp_path / "solo", tmp_path / "batched"
    assert run(*lk, "--out", solo, "--batch-size", 1) == 0
    assert run(*lk, "--out", batched, "--block-size", 5, "--batch-size", 3) == 0
    sharded, resumed = tmp_path / "sharded", tmp_path / "resumed"
    for i in range(3):
        assert run(*lk, "--out", sharded, "--block-size", 4, "--shard", f"{i}/3") == 0
    assert run(*lk, "--out", resumed, "--block-size", 4, "--shard", "1/3") == 0
    assert not (resumed / "likelihood.jsonl").exists()
    assert run(*lk, "--out", resumed, "--block-size", 4, "--resume") == 0
    ref = _values(solo)
    statuses = {v[3] for v in ref}
    assert statuses == {"success", "max_steps"}, statuses             # both kinds of unit occur
    for out in (batched, sharded, resumed):
        assert _values(out) == ref, out.name
    assert (sharded / "likelihood.jsonl").read_bytes() == (resumed / "likelihood.jsonl").read_bytes()
    # nfe: per point when solved alone; in a batched call the call's network evaluations, an upper bound
    assert all(10 < a["nfe"] <= b["nfe"] for a, b in zip(_rows(solo), _rows(batched)))
    cfg = json.loads((solo / "run.json").read_text())["config"]
    assert cfg["per_sample"] is True and cfg["chunk_size"] == 2


def test_likelihood_adaptive_per_sample_float32_bitwise(ckpt, tmp_path):
    """The same in float32: one point per solve and all 9 in one solve agree bitwise."""
    lk = _adaptive(ckpt, "float32")
    assert run(*lk, "--out", tmp_path / "solo", "--batch-size", 1) == 0
    assert run(*lk, "--out", tmp_path / "one", "--block-size", 9, "--batch-size", 9) == 0
    ref = _values(tmp_path / "solo")
    assert {v[3] for v in ref} == {"success", "max_steps"}
    assert _values(tmp_path / "one") == ref


def test_likelihood_per_sample_matches_the_library_solve(ckpt, tmp_path, monkeypatch):
    """The command solves the block's 4 points in one per_sample=True call (after its one-unit
    pre-flight), and its per-point values are those of one solvers.log_likelihood call per point
    (float64, same model wrapping and chunking): equal to 1e-12 relative (measured: bitwise)."""
    import solvers
    from scoresde.cli.common import _load_model
    from scoresde.cli.likelihood import exact_trace_chunk
    from scoresde.data import load_data
    calls, library = [], solvers.log_likelihood

    def recording(model, x, *a, **kw):
        calls.append((x.shape[0], kw.get("per_sample")))
        return library(model, x, *a, **kw)
    monkeypatch.setattr(solvers, "log_likelihood", recording)
    out = tmp_path / "lk"
    assert run("likelihood", "--checkpoint", ckpt, "--data", "gmm", "-n", 4, "--dtype", "float64", "--seed", 0,
               "--rtol", "1e-4", "--atol", "1e-4", "--out", out, "--quiet") == 0
    assert calls == [(1, True), (4, True)]                  # the pre-flight unit, then the block
    monkeypatch.undo()
    args = type("A", (), {"checkpoint": ckpt, "weights": "default", "micro_batch": 64})()
    model, _ = _load_model(args, torch.float64, torch.device("cpu"))
    x = load_data("gmm", n=4, seed=1, dtype=torch.float64)
    for i, r in enumerate(_rows(out)):
        res = solvers.log_likelihood(model, x[i:i + 1], "exact", rtol=1e-4, atol=1e-4, per_sample=True,
                                     chunk_size=exact_trace_chunk(2, 64))
        np.testing.assert_allclose(r["log_prob"], float(res.log_prob[0]), rtol=1e-12, atol=0)
        assert 10 < res.nfe <= r["nfe"]                  # the point's own; the batched call's bound it


# -------------------------------------------------------------- resume / refuse
def test_corrupt_shard_recomputed_alone(reference, ckpt, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    names = sorted(shards(out))
    victim = out / names[2]
    victim.write_bytes(victim.read_bytes()[:100])                   # truncated
    nan_victim = out / names[3]
    with np.load(nan_victim) as z:
        arrays = {k: z[k].copy() for k in z.files}
    arrays["x"][1, 0] = np.nan                                      # loads, but a "success" is non-finite
    from scoresde._runs import npz_bytes
    nan_victim.write_bytes(npz_bytes(arrays))
    (out / "samples.npz").unlink()
    before = {n: (out / n).stat().st_mtime_ns for n in names}
    time.sleep(0.01)
    assert run("sample", "--checkpoint", ckpt, "--out", out, "-n", 37, "--batch-size", 64, "--resume", *SAMPLE) == 0
    assert (out / (names[2] + ".corrupt")).exists() and (out / (names[3] + ".corrupt")).exists()
    assert shards(out) == shards(reference)
    after = {n: (out / n).stat().st_mtime_ns for n in names}
    rewritten = sorted(n for n in names if after[n] != before[n])
    assert rewritten == [names[2], names[3]], "only the corrupt shards may be recomputed"
    assert (out / "samples.npz").read_bytes() == (reference / "samples.npz").read_bytes()


def test_resume_refuses_a_changed_config(reference, ckpt, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    rc = run("sample", "--checkpoint", ckpt, "--out", out, "-n", 37, "--resume", *SAMPLE[:-1], "--quiet",
             "--steps", 5)
    assert rc == 1
    err = capsys.readouterr().err
    assert "configuration differs" in err and "steps: 4 (run.json) -> 5 (now)" in err
    # a different batch size is not a configuration change (results do not depend on it)
    assert run("sample", "--checkpoint", ckpt, "--out", out, "-n", 37, "--batch-size", 2, "--resume", *SAMPLE) == 0


def test_existing_output_needs_resume_or_overwrite(reference, ckpt, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / "notes.txt").write_text("mine")
    assert run("sample", "--checkpoint", ckpt, "--out", out, "-n", 37, *SAMPLE) == 1
    assert "--resume" in capsys.readouterr().err
    assert run("sample", "--checkpoint", ckpt, "--out", out, "-n", 37, "--overwrite", *SAMPLE[:-1], "--quiet",
               "--steps", 5) == 0
    assert (out / "notes.txt").read_text() == "mine", "--overwrite deletes only the run's own files"
    assert json.loads((out / "run.json").read_text())["config"]["steps"] == 5
    # --resume on a directory that does not exist yet simply starts
    fresh = tmp_path / "fresh"
    assert run("sample", "--checkpoint", ckpt, "--out", fresh, "-n", 37, "--resume", *SAMPLE) == 0
    assert (fresh / "samples.npz").read_bytes() == (reference / "samples.npz").read_bytes()


def test_seed_drawn_logged_recorded_and_reused(ckpt, tmp_path, capfd):
    """No --seed: a random seed is printed and recorded in run.json; an
    interrupted or resumed run reuses it, and --seed with that value reproduces the run."""
    out = tmp_path / "drawn"
    args = ["sample", "--checkpoint", ckpt, "-n", 9, "--steps", 3, "--block-size", 4]
    assert run(*args, "--out", out) == 0
    err = capfd.readouterr().err
    seed = json.loads((out / "run.json").read_text())["config"]["seed"]
    assert isinstance(seed, int) and f"seed {seed} (drawn at random" in err
    (out / "samples.npz").unlink()
    (out / "shard-00000004-00000007.npz").unlink()
    assert run(*args, "--out", out, "--resume", "--quiet") == 0          # reuses the recorded seed
    again = tmp_path / "explicit"
    assert run(*args, "--out", again, "--seed", seed, "--quiet") == 0
    assert (out / "samples.npz").read_bytes() == (again / "samples.npz").read_bytes()


def test_unwritable_output_fails_fast_before_loading(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    t0 = time.time()
    rc = run("sample", "--checkpoint", tmp_path / "missing.pt", "--out", blocker / "sub", "-n", 10, "--quiet")
    assert rc == 1 and time.time() - t0 < 5
    err = capsys.readouterr().err
    assert "not writable" in err and "missing.pt" not in err     # pre-flight comes before the checkpoint


def test_finalize_reports_missing_blocks(reference, ckpt, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    victim = sorted(shards(out))[1]
    (out / victim).unlink()
    rc = run("sample", "--checkpoint", ckpt, "--out", out, "-n", 37, "--finalize", *SAMPLE)
    assert rc == 1
    err = capsys.readouterr().err
    assert "found 29 of 37 units; missing blocks: 8-15" in err


def test_on_failure_record(tmp_path, capsys):
    net = scoresde.MLPScoreNet(2, hidden=8, depth=1)
    with torch.no_grad():
        net.out.bias.fill_(float("nan"))
    bad = tmp_path / "nan.pt"
    save_checkpoint(bad, net, scoresde.VPSDE(), "eps", extra={"data": {"shape": [2]}})
    assert run("sample", "--checkpoint", bad, "--out", tmp_path / "a", "-n", 5, "--steps", 3, "--quiet") == 1
    assert "non-finite" in capsys.readouterr().err
    out = tmp_path / "b"
    assert run("sample", "--checkpoint", bad, "--out", out, "-n", 5, "--steps", 3, "--quiet",
               "--on-failure", "record") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["nonfinite"] == 5
    with np.load(out / "samples.npz") as z:
        assert (z["status"] == "nonfinite").all() and np.isnan(z["x"]).all()


def test_quiet_and_progress_output(ckpt, tmp_path, capfd):
    assert run("sample", "--checkpoint", ckpt, "--out", tmp_path / "q", "-n", 9, *SAMPLE) == 0
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""
    assert run("sample", "--checkpoint", ckpt, "--out", tmp_path / "v", "-n", 9, "--steps", 4,
               "--block-size", 4) == 0
    captured = capfd.readouterr()
    assert "sample" in captured.err and "9/9" in captured.err                  # tqdm bar with counts
    assert json.loads(captured.out)["n"] == 9                                   # summary on stdout


# --------------------------------------------------------------- interruption
def _spawn(args: list, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "scoresde", *map(str, args)], cwd=cwd, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_shard(proc: subprocess.Popen, out: Path, timeout: float = 60.0) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if out.is_dir() and any(out.glob("shard-*.npz")):
            return
        if proc.poll() is not None:
            raise AssertionError(f"finished before the first shard was seen: {proc.communicate()}")
        time.sleep(0.005)
    proc.kill()
    raise AssertionError("no shard appeared")


LONG = ["-n", 160, "--steps", 8, "--dtype", "float64", "--block-size", 8, "--seed", 1, "--quiet"]


@pytest.fixture(scope="module")
def long_reference(ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("longref") / "run"
    assert run("sample", "--checkpoint", ckpt, "--out", out, "--batch-size", 64, *LONG) == 0
    return out


def test_sigkill_mid_run_then_resume_is_bitwise_identical(ckpt, long_reference, tmp_path):
    out = tmp_path / "killed"
    proc = _spawn(["sample", "--checkpoint", ckpt, "--out", out, "--batch-size", 1, *LONG], tmp_path)
    _wait_for_shard(proc, out)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    survivors = shards(out)
    assert 1 <= len(survivors) < 20 and not (out / "samples.npz").exists(), "not killed mid-run"
    mtimes = {n: (out / n).stat().st_mtime_ns for n in survivors}
    assert run("sample", "--checkpoint", ckpt, "--out", out, "--batch-size", 7, "--resume", *LONG) == 0
    assert not list(out.glob(".*.tmp-*")), "stale temporaries must be cleaned"
    assert shards(out) == shards(long_reference)
    assert (out / "samples.npz").read_bytes() == (long_reference / "samples.npz").read_bytes()
    assert all((out / n).stat().st_mtime_ns == m for n, m in mtimes.items()), "finished shards were recomputed"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_finishes_the_shard_and_exits_75(ckpt, long_reference, tmp_path, sig):
    out = tmp_path / "sig"
    proc = _spawn(["sample", "--checkpoint", ckpt, "--out", out, "--batch-size", 1, *LONG], tmp_path)
    _wait_for_shard(proc, out)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == cli.EXIT_INTERRUPTED, err
    line = [ln for ln in err.splitlines() if ln.startswith("resume with: ")]
    assert line and "--resume" in line[0], err
    assert not list(out.glob(".*.tmp-*")), "the current shard must be finished, not abandoned"
    progress = json.loads((out / "progress.json").read_text())
    assert progress["status"] == "interrupted" and progress["done"] < 160
    for name, data in shards(out).items():                    # every shard on disk is complete
        assert data == (long_reference / name).read_bytes()
    if sig == signal.SIGTERM:                                 # the printed command resumes the run
        cmd = shlex.split(line[0][len("resume with: "):])
        done = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert (out / "samples.npz").read_bytes() == (long_reference / "samples.npz").read_bytes()


def test_two_gloo_processes_match_one(ckpt, reference, tmp_path):
    """torchrun --nproc_per_node=2 (gloo on CPU): rank r computes blocks r::2, rank 0 merges."""
    out = tmp_path / "dist"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "scoresde",
           "sample", "--checkpoint", str(ckpt), "--out", str(out), "-n", "37", "--batch-size", "3",
           "--dist-timeout", "120", *map(str, SAMPLE)]
    done = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert shards(out) == shards(reference)
    assert (out / "samples.npz").read_bytes() == (reference / "samples.npz").read_bytes()
    assert json.loads((out / "run.json").read_text())["config"] == \
        json.loads((reference / "run.json").read_text())["config"]


# ------------------------------------------------------------------- training
def _train_and_score(tmp_path: Path, train_args: list, n_eval: int, ode_steps: int) -> dict:
    model = tmp_path / "gmm.pt"
    assert run("train", "--data", "gmm", "--out", model, "--quiet", *train_args) == 0
    out = tmp_path / "nll"
    assert run("likelihood", "--checkpoint", model, "--data", "gmm", "-n", n_eval, "--data-seed", 1, "--out", out,
               "--method", "rk4", "--ode-steps", ode_steps, "--quiet") == 0
    return json.loads((out / "summary.json").read_text())


def test_training_reaches_the_exact_entropy_quick(tmp_path):
    """Seconds-scale version: a small MLP, 600 steps of likelihood-weighted DSM; the mean NLL on
    held-out points (a different seed) is within 0.4 nats of the exact density's (measured: 0.14;
    the full-size version below: 0.05).  The gap is a KL divergence, so it cannot be much below 0."""
    s = _train_and_score(tmp_path, ["--steps", 600, "--batch-size", 256, "--hidden", 64, "--depth", 2,
                                    "--lr", 4e-3, "--weighting", "likelihood"], n_eval=300, ode_steps=50)
    gap = s["nll_minus_exact_mean"]
    assert -3 * s["nll_minus_exact_stderr"] < gap < 0.4, s


@pytest.mark.slow
def test_training_reaches_the_exact_entropy_full(tmp_path):
    """The README loop at full size (about a minute or two on 2 CPU cores): within 0.05 nats of the
    exact entropy estimate on 2000 held-out points."""
    s = _train_and_score(tmp_path, ["--steps", 4000, "--weighting", "likelihood"], n_eval=2000, ode_steps=100)
    assert abs(s["nll_minus_exact_mean"]) < 0.05, s


def test_train_interrupt_and_resume_is_bitwise(tmp_path, monkeypatch, capsys):
    """SIGINT during training saves a checkpoint at the finished step and exits 75; resuming
    (optimizer, EMA, step and generator state restored) gives bitwise the weights of an
    uninterrupted run.  The signal is sent from inside the 15th loss evaluation."""
    from scoresde.losses import DSMLoss
    base = ["train", "--data", "moons", "--batch-size", 64, "--hidden", 16, "--depth", 1, "--steps", 40, "--quiet"]
    ref, out = tmp_path / "ref.pt", tmp_path / "m.pt"
    assert run(*base, "--out", ref) == 0
    calls = {"n": 0}
    original = DSMLoss.__call__

    def interrupting(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 15:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, *a, **k)

    monkeypatch.setattr(DSMLoss, "__call__", interrupting)
    assert run(*base, "--out", out) == cli.EXIT_INTERRUPTED
    monkeypatch.undo()
    assert "resume with:" in capsys.readouterr().err
    _, cfg = load_checkpoint(out)
    assert cfg["train"]["step"] == 15
    assert run(*base, "--out", out) == 1                          # exists: needs --resume/--overwrite
    assert "--resume" in capsys.readouterr().err
    assert run(*base, "--out", out, "--resume", "--lr", "1e-2") == 1    # a changed setting is refused
    assert "train.lr: 0.002 (checkpoint) -> 0.01 (now)" in capsys.readouterr().err
    assert run(*base, "--out", out, "--resume") == 0
    a, b = torch.load(ref, weights_only=True), torch.load(out, weights_only=True)
    for key in ("state_dict", "raw_state_dict"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key


def test_images_from_a_user_file_use_the_unet(tmp_path):
    """A .npy of 28x28 images trains the U-Net; sample writes [N, 1, 28, 28] and no plot."""
    imgs = np.random.default_rng(0).uniform(-1, 1, (16, 1, 28, 28)).astype(np.float32)
    np.save(tmp_path / "imgs.npy", imgs)
    model = tmp_path / "unet.pt"
    assert run("train", "--data", tmp_path / "imgs.npy", "--out", model, "--steps", 2, "--batch-size", 4,
               "--channels", 8, "--quiet") == 0
    _, cfg = load_checkpoint(model)
    assert cfg["net"]["class"] == "UNet" and cfg["data"]["shape"] == [1, 28, 28]
    out = tmp_path / "s"
    assert run("sample", "--checkpoint", model, "--out", out, "-n", 2, "--steps", 2, "--micro-batch", 2,
               "--seed", 0, "--quiet") == 0
    with np.load(out / "samples.npz") as z:
        assert z["x"].shape == (2, 1, 28, 28) and np.isfinite(z["x"]).all()
    assert not (out / "samples.png").exists()
    with pytest.raises(SystemExit):                      # an MLP cannot take images
        run("train", "--data", tmp_path / "imgs.npy", "--out", tmp_path / "m.pt", "--net", "mlpx")
    assert run("train", "--data", tmp_path / "imgs.npy", "--out", tmp_path / "m.pt", "--net", "mlp",
               "--steps", 1, "--quiet") == 1


# ------------------------------------------------------------------- validate
def test_validate_command(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exc:
        run("validate", "--", "--help")
    assert exc.value.code == 0
    assert "validation" in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "validation.suite", None)        # as if not importable
    assert run("validate") == 2
    assert "python -m validation" in capsys.readouterr().err


def test_console_script_and_module_entry(tmp_path):
    done = subprocess.run([sys.executable, "-m", "scoresde", "--help"], env=ENV, capture_output=True, text=True)
    assert done.returncode == 0 and "train" in done.stdout and "likelihood" in done.stdout
    script = Path(sys.executable).parent / "scoresde"
    if script.exists():
        done = subprocess.run([str(script), "sample", "--help"], env=ENV, capture_output=True, text=True)
        assert done.returncode == 0 and "--resume" in done.stdout
