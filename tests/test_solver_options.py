"""Option validation only checks; values derived from the options are set in __post_init__."""
import dataclasses

import pytest

import solvers
from solvers import _registry


@pytest.mark.parametrize("name, options", [("ddim", {"eta": 1}), ("ddim", {"eta": 0}),
                                           ("pc", {"predictor": "dpmpp_2m", "snr": 1, "corrector_steps": 2}),
                                           ("pc", {"corrector": "none"})])
def test_validate_options_changes_nothing(name, options):
    cls = _registry._REGISTRY[name]
    raw = object.__new__(cls)                   # the options as given, before __post_init__
    for field in dataclasses.fields(cls):
        setattr(raw, field.name, options.get(field.name, field.default))
    before = dict(vars(raw))
    raw.validate_options()
    assert vars(raw) == before and all(type(vars(raw)[k]) is type(v) for k, v in before.items())


def test_derived_values_follow_the_options():
    assert solvers.get("ddim").stochastic is False and solvers.get("ddim", eta=0.5).stochastic is True
    assert isinstance(solvers.get("ddim", eta=1).eta, float)
    pc = solvers.get("pc", predictor="dpmpp_2m", corrector="none", snr=1)
    assert (pc.stochastic, pc.order, pc.default_schedule, pc.snr) == (False, 2, "log_snr", 1.0)
    assert solvers.get("pc").stochastic is True


def test_order_is_a_class_constant_except_unipc_and_pc():
    for name in solvers.available_methods():
        cls = _registry._REGISTRY[name]
        if name == "unipc":
            assert "order" in {f.name for f in dataclasses.fields(cls)}
            assert solvers.get(name, order=2).order == 2
        elif name != "pc":
            assert solvers.get(name).order == cls.order
