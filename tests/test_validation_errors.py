"""Bad input gets a ValueError/TypeError whose message names the argument (and, where it
applies, the value and the valid range; the list is in docs/reliability.md), raised once at
the boundary, and no invalid call reaches the network."""
from __future__ import annotations

import math

import pytest
import torch

import scoresde
from scoresde import (
    CosineVPSDE,
    DiscreteVPSDE,
    EDMSDE,
    Gaussian,
    GaussianMixture,
    RectifiedFlowSDE,
    SDE,
    ScoreModel,
    VESDE,
    VPSDE,
)
from scoresde._checks import check_int

F64 = torch.float64
NAN = float("nan")


class CountingNet:
    def __init__(self, out_shape=None):
        self.n = 0
        self.out_shape = out_shape

    def __call__(self, x, t, *cond):
        self.n += 1
        return torch.zeros(self.out_shape or x.shape, dtype=x.dtype)


class _NotLinear(SDE):
    def drift(self, x, t):
        return -x

    def diffusion(self, t):
        return torch.ones_like(t)


_x = torch.zeros(4, 3, dtype=F64)
_mean = torch.zeros(3, dtype=F64)
_gauss = Gaussian(_mean, 1.0)
_vp = VPSDE()


def _x_with_nans():
    x = torch.zeros(4, 3, dtype=F64)
    x[1, 0] = NAN
    x[3, 2] = float("inf")
    x[3, 1] = NAN
    return x


# (id, callable, exception type, regex the message must match)
CASES = [
    # --- SDE parameters
    ("vp_beta_min_gt_max", lambda: VPSDE(beta_min=5.0, beta_max=1.0), ValueError,
     r"beta_min must be <= beta_max.*beta_min=5.0.*beta_max=1.0"),
    ("vp_beta_min_zero", lambda: VPSDE(beta_min=0.0), ValueError, r"beta_min must be > 0"),
    ("vp_beta_min_negative", lambda: VPSDE(beta_min=-0.1, beta_max=20.0), ValueError, r"beta_min .*-0\.1"),
    ("vp_beta_max_nan", lambda: VPSDE(beta_max=NAN), ValueError, r"beta_max must be finite"),
    ("vp_beta_min_string", lambda: VPSDE(beta_min="0.1"), TypeError, r"beta_min must be a real number"),
    ("vp_T_nonpositive", lambda: VPSDE(T=0.0), ValueError, r"\bT must be > 0"),
    ("subvp_nan", lambda: scoresde.SubVPSDE(beta_min=NAN), ValueError, r"beta_min must be finite"),
    ("ve_min_ge_max", lambda: VESDE(sigma_min=50.0, sigma_max=1.0), ValueError,
     r"sigma_min must be < sigma_max.*sigma_min=50.0.*sigma_max=1.0"),
    ("ve_min_eq_max", lambda: VESDE(sigma_min=1.0, sigma_max=1.0), ValueError, r"sigma_min must be < sigma_max"),
    ("ve_sigma_min_zero", lambda: VESDE(sigma_min=0.0), ValueError, r"sigma_min must be > 0"),
    ("ve_sigma_max_inf", lambda: VESDE(sigma_max=math.inf), ValueError, r"sigma_max must be finite"),
    ("edm_min_ge_max", lambda: EDMSDE(sigma_min=100.0, sigma_max=80.0), ValueError, r"sigma_min must be < sigma_max"),
    ("edm_sigma_min_negative", lambda: EDMSDE(sigma_min=-0.002), ValueError, r"sigma_min must be > 0"),
    ("edm_nan", lambda: EDMSDE(sigma_max=NAN), ValueError, r"sigma_max must be finite"),
    ("cosine_T_one", lambda: CosineVPSDE(T=1.0), ValueError, r"\bT must be < 1"),
    ("cosine_T_zero", lambda: CosineVPSDE(T=0.0), ValueError, r"\bT must be > 0"),
    ("cosine_s_negative", lambda: CosineVPSDE(s=-0.01), ValueError, r"\bs must be >= 0"),
    ("rf_T_above_one", lambda: RectifiedFlowSDE(T=1.5), ValueError, r"\bT must be < 1"),
    # --- DiscreteVPSDE
    ("discrete_beta_above_one", lambda: DiscreteVPSDE(betas=[0.1, 1.2, 0.3]), ValueError,
     r"betas must lie in \(0, 1\); betas\[1\]=1\.2"),
    ("discrete_beta_zero", lambda: DiscreteVPSDE(betas=[0.1, 0.2, 0.0]), ValueError, r"betas\[2\]=0\.0"),
    ("discrete_beta_nan", lambda: DiscreteVPSDE(betas=[0.1, NAN]), ValueError, r"betas must be finite; betas\[1\]"),
    ("discrete_ac_not_monotone", lambda: DiscreteVPSDE(alphas_cumprod=[0.9, 0.95, 0.5]), ValueError,
     r"alphas_cumprod must be strictly decreasing; alphas_cumprod\[1\]"),
    ("discrete_ac_out_of_range", lambda: DiscreteVPSDE(alphas_cumprod=[0.9, -0.1]), ValueError,
     r"alphas_cumprod must lie in \(0, 1\]; alphas_cumprod\[1\]"),
    ("discrete_both", lambda: DiscreteVPSDE(betas=[0.1], alphas_cumprod=[0.9]), ValueError,
     r"exactly one of betas or alphas_cumprod"),
    ("discrete_neither", lambda: DiscreteVPSDE(), ValueError, r"exactly one of betas or alphas_cumprod"),
    ("discrete_betas_strings", lambda: DiscreteVPSDE(betas=["a", 0.1]), TypeError,
     r"betas must be a 1-d tensor or sequence of numbers"),
    ("discrete_2d", lambda: DiscreteVPSDE(betas=[[0.1, 0.2]]), ValueError, r"betas must be a non-empty 1-d"),
    # --- times
    ("t_above_T", lambda: _vp.alpha(1.5), ValueError, r"t=1\.5 is outside \[0, T\]=\[0, 1\] of VPSDE"),
    ("t_negative", lambda: _vp.sigma(torch.tensor([0.5, -0.1], dtype=F64)), ValueError,
     r"t=-0\.1 is outside \[0, T\].* of VPSDE"),
    ("t_above_T_edm", lambda: EDMSDE().sigma(81.0), ValueError, r"outside \[0, T\]=\[0, 80\] of EDMSDE"),
    ("t_nan", lambda: _vp.log_snr(torch.tensor([0.5, NAN], dtype=F64)), ValueError,
     r"t must be finite.*index \[1\]"),
    ("t_string", lambda: _vp.alpha("0.5"), TypeError, r"t must be a float or a tensor"),
    ("t_B1", lambda: _vp.marginal(_x, torch.full((4, 1), 0.5, dtype=F64)), ValueError,
     r"t must be a float, a 0-d tensor or shape \[B\]=\[4\], got \[4, 1\]"),
    ("t_wrong_batch", lambda: _vp.drift(_x, torch.full((5,), 0.5, dtype=F64)), ValueError,
     r"t must be .*shape \[B\]=\[4\], got \[5\]"),
    ("lam_out_of_range", lambda: _vp.t_of_log_snr(-100.0), ValueError, r"lam must lie in \[log_snr\(T\), log_snr\(0\)\]"),
    ("lam_nan", lambda: _vp.t_of_log_snr(torch.tensor([NAN], dtype=F64)), ValueError, r"lam must not be NaN"),
    # --- tensors
    ("marginal_int_x0", lambda: _vp.marginal(torch.zeros(4, 3, dtype=torch.int64), 0.5), TypeError,
     r"x0 must be floating point, got torch.int64"),
    ("prior_log_prob_int", lambda: _vp.prior_log_prob(torch.zeros(4, 3, dtype=torch.uint8)), TypeError,
     r"z must be floating point"),
    ("prior_log_prob_0d", lambda: _vp.prior_log_prob(torch.tensor(0.0)), ValueError, r"z must have a batch dimension"),
    ("drift_not_tensor", lambda: _vp.drift([1.0, 2.0], 0.5), TypeError, r"x must be a torch.Tensor"),
    # --- analytic targets
    ("cov_not_psd", lambda: Gaussian(torch.zeros(2, dtype=F64), torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=F64)),
     ValueError, r"cov must be positive semi-definite; smallest eigenvalue -1"),
    ("cov_not_symmetric", lambda: Gaussian(torch.zeros(2, dtype=F64), torch.tensor([[1.0, 0.5], [0.0, 1.0]], dtype=F64)),
     ValueError, r"cov must be symmetric"),
    ("cov_wrong_shape", lambda: Gaussian(torch.zeros(3, dtype=F64), torch.eye(2, dtype=F64)), ValueError,
     r"cov must have shape \[\] or \[3\] or \[3, 3\], got \[2, 2\]"),
    ("cov_negative_diag", lambda: Gaussian(torch.zeros(2, dtype=F64), torch.tensor([1.0, -1.0], dtype=F64)),
     ValueError, r"cov .*must be >= 0"),
    ("cov_nan", lambda: Gaussian(torch.zeros(2, dtype=F64), NAN), ValueError, r"cov must be finite"),
    ("mean_2d", lambda: Gaussian(torch.zeros(2, 2, dtype=F64), 1.0), ValueError, r"mean must have shape \[d\]"),
    ("weights_sum", lambda: GaussianMixture([0.5, 0.4], torch.zeros(2, 3, dtype=F64), [1.0, 1.0]), ValueError,
     r"weights must sum to 1, got 0\.9"),
    ("weights_negative", lambda: GaussianMixture([1.5, -0.5], torch.zeros(2, 3, dtype=F64), [1.0, 1.0]), ValueError,
     r"weights must be >= 0, got min -0\.5"),
    ("weights_shape", lambda: GaussianMixture([1.0], torch.zeros(2, 3, dtype=F64), [1.0, 1.0]), ValueError,
     r"weights must have shape \[K\]=\[2\], got \[1\]"),
    ("means_1d", lambda: GaussianMixture([1.0], torch.zeros(3, dtype=F64), [1.0]), ValueError,
     r"means must have shape \[K, d\]"),
    ("covs_not_psd", lambda: GaussianMixture([0.5, 0.5], torch.zeros(2, 2, dtype=F64),
                                              torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 3.0], [3.0, 1.0]]],
                                                           dtype=F64)),
     ValueError, r"covs must be positive semi-definite"),
    ("covs_wrong_shape", lambda: GaussianMixture([0.5, 0.5], torch.zeros(2, 3, dtype=F64), torch.ones(3, dtype=F64)),
     ValueError, r"covs must have shape"),
    ("target_x_wrong_dim", lambda: _gauss.score(torch.zeros(4, 2, dtype=F64), 0.5, _vp), ValueError,
     r"x must have shape \[B, 3\], got \[4, 2\]"),
    ("target_int_x", lambda: _gauss.log_prob(torch.zeros(4, 3, dtype=torch.int32)), TypeError, r"x must be floating"),
    ("target_sde_not_linear", lambda: _gauss.score(_x, 0.5, _NotLinear()), TypeError,
     r"sde must be a LinearSDE.*_NotLinear"),
    ("target_marginal_vector_t", lambda: _gauss.marginal(_vp, torch.tensor([0.1, 0.2], dtype=F64)), ValueError,
     r"t must be a single time"),
    ("target_t_out_of_range", lambda: _gauss.score(_x, 2.0, _vp), ValueError, r"t=2 is outside \[0, T\]"),
    ("flow_t_from_out_of_range", lambda: _gauss.flow(_x, -1.0, 0.5, _vp), ValueError,
     r"t_from=-1 is outside \[0, T\]"),
    ("flow_t_to_wrong_batch", lambda: _gauss.flow(_x, 0.5, torch.zeros(3, dtype=F64), _vp), ValueError,
     r"t_to must be .*\[B\]=\[4\], got \[3\]"),
    ("sample_n_negative", lambda: _gauss.sample(-1), ValueError, r"n must be >= 0, got -1"),
    ("sample_n_float", lambda: _gauss.sample(2.5), TypeError, r"n must be an int, got 2\.5"),
    ("log_prob_singular", lambda: Gaussian(_mean, 0.0).log_prob(_x), ValueError, r"log_prob is undefined for a singular"),
    # --- ScoreModel construction
    ("prediction_unknown", lambda: ScoreModel(CountingNet(), _vp, "noise"), ValueError,
     r"prediction must be one of 'eps', 'x0', 'v', 'score', 'edm', 'flow'; got 'noise'"),
    ("prediction_not_string", lambda: ScoreModel(CountingNet(), _vp, 3), TypeError, r"prediction must be a string"),
    ("model_sde_not_linear", lambda: ScoreModel(CountingNet(), _NotLinear()), TypeError,
     r"sde must be a LinearSDE.*_NotLinear"),
    ("model_net_not_callable", lambda: ScoreModel(42, _vp), TypeError, r"net must be callable, got int"),
    ("time_input_discrete_non_discrete", lambda: ScoreModel(CountingNet(), _vp, time_input="discrete"), TypeError,
     r"time_input='discrete' needs a DiscreteVPSDE; got VPSDE"),
    ("time_input_unknown", lambda: ScoreModel(CountingNet(), _vp, time_input="steps"), ValueError,
     r"time_input must be one of .*'discrete'.*got 'steps'"),
    ("sigma_data_zero", lambda: ScoreModel(CountingNet(), _vp, "edm", sigma_data=0.0), ValueError,
     r"sigma_data must be > 0"),
    ("guided_scale_nan", lambda: ScoreModel(CountingNet(), _vp).guided(1, 0, NAN), ValueError,
     r"scale must be finite"),
    ("guided_scale_string", lambda: ScoreModel(CountingNet(), _vp).guided(1, 0, "3"), TypeError,
     r"scale must be a real number"),
    ("guided_missing_uncond", lambda: ScoreModel(CountingNet(), _vp).guided(1, None, 2.0), ValueError,
     r"needs both cond and uncond"),
    ("as_model_callable_time_input", lambda: _gauss.as_model(_vp, "eps", time_input=lambda t: t), ValueError,
     r"time_input of an exact model must be one of"),
    # --- integer options
    ("check_int_bool", lambda: check_int(True, "steps"), TypeError, r"steps must be an int, got True \(bool\)"),
    ("check_int_float", lambda: check_int(10.0, "steps"), TypeError, r"steps must be an int, got 10\.0 \(float\)"),
    ("check_int_str", lambda: check_int("10", "steps"), TypeError, r"steps must be an int, got '10' \(str\)"),
    ("check_int_min", lambda: check_int(0, "steps", minimum=1), ValueError, r"steps must be >= 1, got 0"),
]


@pytest.mark.parametrize("fn, exc, match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_and_names_the_argument(fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()


def test_catalogue_is_large_enough():
    assert len(CASES) >= 25
    assert len({c[0] for c in CASES}) == len(CASES)


# --------------------------------------------------------------------------- model calls: no NFE
MODEL_CASES = [
    ("x_int", lambda: torch.zeros(4, 3, dtype=torch.int64), 0.5, TypeError,
     r"x must be floating point, got torch.int64"),
    ("x_uint8", lambda: torch.zeros(4, 3, dtype=torch.uint8), 0.5, TypeError, r"x must be floating point"),
    ("x_nan", _x_with_nans, 0.5, ValueError, r"x has 3 non-finite values \(samples \[1, 3\]\)"),
    ("x_0d", lambda: torch.tensor(1.0, dtype=F64), 0.5, ValueError, r"x must have a batch dimension"),
    ("t_B1", lambda: _x.clone(), torch.full((4, 1), 0.5, dtype=F64), ValueError,
     r"t must be a float, a 0-d tensor or shape \[B\]=\[4\], got \[4, 1\]"),
    ("t_wrong_batch", lambda: _x.clone(), torch.full((3,), 0.5, dtype=F64), ValueError,
     r"t must be .*shape \[B\]=\[4\], got \[3\]"),
    ("t_above_T", lambda: _x.clone(), 1.01, ValueError, r"t=1\.01 is outside \[0, T\]=\[0, 1\] of VPSDE"),
    ("t_negative", lambda: _x.clone(), torch.tensor(-0.5, dtype=F64), ValueError, r"t=-0\.5 is outside \[0, T\]"),
    ("t_nan", lambda: _x.clone(), NAN, ValueError, r"t must be finite"),
    ("t_inf", lambda: _x.clone(), torch.tensor([0.1, 0.2, math.inf, 0.3], dtype=F64), ValueError,
     r"t must be finite.*index \[2\]"),
]


@pytest.mark.parametrize("method", ["eps", "x0", "score", "v"])
@pytest.mark.parametrize("make_x, t, exc, match", [c[1:] for c in MODEL_CASES], ids=[c[0] for c in MODEL_CASES])
def test_invalid_model_calls_do_not_reach_the_net(method, make_x, t, exc, match):
    net = CountingNet()
    model = ScoreModel(net, _vp, "eps")
    x = make_x()
    x_before = x.clone()
    with pytest.raises(exc, match=match):
        getattr(model, method)(x, t)
    assert net.n == 0 and model.nfe == 0
    assert torch.equal(x.nan_to_num(), x_before.nan_to_num())          # the input is not modified


def test_guided_invalid_call_does_not_reach_the_net():
    net = CountingNet()
    model = ScoreModel(net, _vp, "eps").guided(torch.ones(1), torch.zeros(1), 2.0)
    with pytest.raises(ValueError, match=r"t must be .*\[B\]=\[4\], got \[4, 1\]"):
        model.eps(_x, torch.full((4, 1), 0.5, dtype=F64))
    assert net.n == 0 and model.nfe == 0


def test_net_returning_wrong_shape():
    """Row 39: the first call raises with both shapes (the call itself is counted: it happened)."""
    net = CountingNet(out_shape=(4, 6))
    model = ScoreModel(net, _vp, "eps")
    with pytest.raises(ValueError, match=r"net output shape \(4, 6\) != x shape \(4, 3\)"):
        model.eps(_x, 0.5)
    assert net.n == 1 == model.nfe


def test_net_returning_non_tensor():
    model = ScoreModel(lambda x, t: x.numpy(), _vp, "eps")
    with pytest.raises(TypeError, match=r"net must return a tensor, got ndarray"):
        model.eps(_x, 0.5)


def test_net_on_another_device():
    if not torch.cuda.is_available():
        pytest.skip("needs a second device")
    model = ScoreModel(lambda x, t: x.cuda(), _vp, "eps")
    with pytest.raises(ValueError, match=r"net returned a tensor on cuda"):
        model.eps(_x, 0.5)


def test_validation_does_not_mutate_parameters():
    betas = torch.tensor([0.1, 1.5], dtype=F64)
    before = betas.clone()
    with pytest.raises(ValueError, match="betas"):
        DiscreteVPSDE(betas=betas)
    assert torch.equal(betas, before)
    cov = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=F64)
    before = cov.clone()
    with pytest.raises(ValueError, match="cov"):
        Gaussian(torch.zeros(2, dtype=F64), cov)
    assert torch.equal(cov, before)


def test_edge_values_that_are_valid():
    """The boundaries of the valid ranges are accepted (no off-by-one in the checks)."""
    VPSDE(beta_min=1.0, beta_max=1.0)                       # constant rate is allowed
    CosineVPSDE(s=0.0)
    DiscreteVPSDE(betas=[0.5])                              # N = 1
    assert float(_vp.alpha(0.0)) == 1.0 and float(_vp.alpha(1.0)) > 0
    assert float(_vp.alpha(torch.tensor(1.0, dtype=torch.float32) + 1e-7)) > 0  # float32 round-off at T
    Gaussian(_mean, 0.0)                                    # a point mass
    GaussianMixture([0.5, 0.5 + 1e-9], torch.zeros(2, 3, dtype=F64), [1.0, 1.0])  # renormalised
    assert check_int(3, "steps", minimum=1) == 3
    assert ScoreModel(CountingNet(), _vp).eps(torch.zeros(0, 3, dtype=F64), 0.5).shape == (0, 3)
