"""``validation.on_model`` and ``scoresde validate``: the solvers measured on a given network
against its own pf_ode reference, the recommendation per NFE budget, and the CLI verb."""
from __future__ import annotations

import json
import math

import pytest
import torch

import scoresde
from scoresde import cli
from scoresde.checkpoint import save_checkpoint
from scoresde.nets import MLPScoreNet, UNet
import validation
from validation import suite

import validation.model_check as om

F64 = torch.float64


def gaussian_model():
    target = scoresde.Gaussian(torch.tensor([0.5, -1.0], dtype=F64),
                               torch.tensor([[0.30, 0.05], [0.05, 0.10]], dtype=F64))
    return target, target.as_model(scoresde.VPSDE(), "eps")


def x_T(model, n=16, seed=0):
    return model.sde.prior_sample([n, 2], torch.Generator().manual_seed(seed), dtype=F64)


@pytest.fixture(scope="module")
def measured():
    target, model = gaussian_model()
    x = x_T(model)
    res = om.on_model(model, x, nfes=(5, 10, 20, 40), methods=["ddim", "dpmpp_2m", "heun"],
                      schedules=[None, "uniform"], ref_tol=1e-8)
    return target, model, x, res


def test_results_keys_and_reference_check(measured):
    target, model, x, res = measured
    assert set(res) >= {"reference", "methods", "recommended", "setup"}
    ref = res["reference"]
    assert ref["method"] == "pf_ode" and ref["rtol"] == ref["atol"] == 1e-8 and ref["nfe"] > 0
    assert ref["check"]["rtol"] == 1e-9 and ref["check"]["nfe"] >= ref["nfe"]
    # the recorded error estimate is the reference's real error to within a factor 10 (exact flow here)
    exact = target.flow(x, model.sde.T, model.sde.default_t_end, model.sde)
    ref_x, _ = om.reference(model, x, model.sde.default_t_end, 1e-8)
    true_err = float((ref_x - exact).pow(2).mean().sqrt())
    assert 0 < ref["error"] < 1e-6 and true_err < 10 * ref["error"] + 1e-12
    names = {"ddim[uniform]", "dpmpp_2m[log_snr]", "dpmpp_2m[uniform]", "heun[karras]", "heun[uniform]"}
    assert set(res["methods"]) == names
    for r in res["methods"].values():
        assert len(r["nfe"]) == len(r["error"]) > 0 and all(n <= 40 for n in r["nfe"])
        assert {"method", "schedule", "options", "fitted_order", "nfe_to"} <= set(r)


def test_orders_fitted_on_the_network(measured):
    res = measured[3]["methods"]
    assert abs(res["ddim[uniform]"]["fitted_order"] - 1) < 0.3
    assert abs(res["heun[karras]"]["fitted_order"] - 2) < 0.3
    assert res["dpmpp_2m[log_snr]"]["error"][-1] < res["ddim[uniform]"]["error"][-1]


def test_recommended_is_the_smallest_measured_error_within_budget(measured):
    res = measured[3]
    assert set(res["recommended"]) == {"5", "10", "20", "40"}
    for budget, rec in res["recommended"].items():
        within = [(e, name) for name, r in res["methods"].items() for n, e in zip(r["nfe"], r["error"])
                  if n <= int(budget) and math.isfinite(e)]
        assert rec["error"] == min(within)[0] and rec["name"] == min(within)[1] and rec["nfe"] <= int(budget)
        r = res["methods"][rec["name"]]
        assert (rec["method"], rec["schedule"], rec["options"]) == (r["method"], r["schedule"], r["options"])


def test_write_report(measured, tmp_path):
    om.write_report(measured[3], tmp_path, plots=False)
    data = json.loads((tmp_path / "results.json").read_text())
    assert {"reference", "methods", "recommended"} <= set(data)
    assert data["recommended"]["10"]["method"] in ("ddim", "dpmpp_2m", "heun")
    text = (tmp_path / "report.md").read_text()
    assert "Recommended configuration per NFE budget" in text and "10x tighter" in text


def test_library_entry_point():
    assert validation.on_model is om.on_model


def test_configurations_cover_every_deterministic_method():
    methods = om.deterministic_methods()
    assert {"ddim", "euler", "heun", "dpm_solver_3", "dpmpp_3m", "unipc"} <= set(methods)
    assert not {"euler_maruyama", "ancestral", "pf_ode", "dpmpp_2m_sde"} & set(methods)
    unipc = [c for c in om.configurations(["unipc"], ["log_snr"])]
    assert sorted((c.options["order"], c.options["variant"]) for c in unipc) == \
        [(2, "bh1"), (2, "bh2"), (3, "bh1"), (3, "bh2")]


def test_bad_input_before_any_solve():
    _, model = gaussian_model()
    x = x_T(model, 4)
    with pytest.raises(TypeError, match="ScoreModel"):
        om.on_model(lambda x, t: x, x)
    with pytest.raises(ValueError, match="x_T"):
        om.on_model(model, torch.zeros(2, dtype=F64))
    with pytest.raises(ValueError, match="euler_maruyama"):
        om.on_model(model, x, methods=["euler_maruyama"])
    with pytest.raises(ValueError, match="schedules"):
        om.on_model(model, x, schedules=["linear"])
    with pytest.raises(ValueError, match="nfes"):
        om.on_model(model, x, nfes=[0, 5])
    with pytest.raises(ValueError, match="t_end"):
        om.on_model(model, x, t_end=2.0)


# ------------------------------------------------------------------------------ CLI
def run(*argv) -> int:
    return cli.main([str(a) for a in argv])


def test_cli_validate_quick_parses_without_dashes(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(suite, "run", lambda args: seen.append(args) or 0)   # the suite itself: not run here
    assert run("validate", "--quick", "--methods", "ddim") == 0
    assert seen[-1].quick is True and seen[-1].methods == ["ddim"] and seen[-1].out == "validation-report"
    assert seen[-1].tol == suite.parser().get_default("tol")
    assert run("validate", "--full", "--out", "rep") == 0 and seen[-1].quick is False and seen[-1].out == "rep"
    assert run("validate", "--", "--quick") == 0 and seen[-1].quick is True          # the old spelling
    with pytest.raises(SystemExit) as exc:
        run("validate", "--help")
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert all(o in text for o in ("--quick", "--full", "--sdes", "--record-bounds", "--checkpoint", "--nfe"))


def test_cli_validate_checkpoint(tmp_path, capsys):
    ckpt = tmp_path / "mlp.pt"
    save_checkpoint(ckpt, MLPScoreNet(2, hidden=16, depth=2), scoresde.VPSDE(), "eps",
                    extra={"data": {"shape": [2]}})
    out = tmp_path / "val"
    assert run("validate", "--checkpoint", ckpt, "--out", out, "--quick", "--nfe", 4, 8, "--methods", "dpmpp_2m",
               "--n", 4, "--ref-tol", 1e-5, "--no-plots", "--quiet") == 0
    data = json.loads((out / "results.json").read_text())
    assert set(data["methods"]) == {"dpmpp_2m[log_snr]"} and data["methods"]["dpmpp_2m[log_snr]"]["nfe"] == [4, 8]
    assert data["setup"]["n"] == 4 and data["setup"]["seed"] == 0 and data["setup"]["shape"] == [2]
    assert 0 < data["reference"]["error"] < 1e-3 and data["reference"]["rtol"] == 1e-5
    assert data["recommended"]["8"]["method"] == "dpmpp_2m" and (out / "report.md").exists()


def test_cli_validate_bad_input(tmp_path, capsys):
    assert run("validate", "--checkpoint", tmp_path / "missing.pt", "--out", tmp_path / "o") == 1
    assert "missing.pt" in capsys.readouterr().err
    ckpt = tmp_path / "unet.pt"                     # an image network without a recorded data shape
    save_checkpoint(ckpt, UNet(1, channels=8, channel_mults=(1,), attention=False), scoresde.VPSDE(), "eps")
    assert run("validate", "--checkpoint", ckpt, "--out", tmp_path / "o", "--quiet") == 1
    assert "data shape" in capsys.readouterr().err
    assert run("validate", "--checkpoint", ckpt, "--quiet") == 1
    assert "--out" in capsys.readouterr().err
    assert run("validate", "--checkpoint", ckpt, "--out", tmp_path / "o", "--sdes", "vp") == 1
    assert "--sdes" in capsys.readouterr().err
    assert run("validate", "--checkpoint", ckpt, "--out", tmp_path / "o", "--tol", 0.2) == 1
    assert "--tol" in capsys.readouterr().err
    for extra in (["--n", 5], ["--weights", "raw"], ["--no-plots"]):      # model-only options without --checkpoint
        assert run("validate", *extra) == 1
        err = capsys.readouterr().err
        assert extra[0] in err and "--checkpoint" in err
    assert not (tmp_path / "o").exists()
