r"""iPNDM: the improved pseudo-numerical method, a fixed-weight Adams--Bashforth method.

Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential Integrator" (ICLR),
Sec. 5 / App. (iPNDM: PNDM's linear multistep part with a lower-order warm-up instead of
Runge--Kutta starting steps); the form of Zhou et al. 2024, "Fast ODE-based Sampling for
Diffusion Models in Around 5 Steps" (CVPR) and of the k-diffusion ``sample_ipndm`` of
ComfyUI (from zju-pi/diff-sampler).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from scoresde.sde import SDE

from ._registry import register
from .base import StepTable
from .deis import EpsMultistep

__all__ = ["IPNDM", "AB_WEIGHTS"]

#: Adams--Bashforth weights for equal steps, newest evaluation first (orders 1..4)
AB_WEIGHTS = {
    1: (1.0,),
    2: (3.0 / 2.0, -1.0 / 2.0),
    3: (23.0 / 12.0, -16.0 / 12.0, 5.0 / 12.0),
    4: (55.0 / 24.0, -59.0 / 24.0, 37.0 / 24.0, -9.0 / 24.0),
}


@register("ipndm")
@dataclass
class IPNDM(EpsMultistep):
    r"""iPNDM (Zhang & Chen 2023): Adams--Bashforth with the **fixed** equal-step weights on
    the probability-flow ODE in the scaled state :math:`y = x/\alpha` and time
    :math:`s = \sigma/\alpha = e^{-\lambda}`, :math:`dy/ds = \hat\epsilon(x, t)` (for EDM,
    :math:`\alpha = 1`: :math:`dx/d\sigma = (x - D(x,\sigma))/\sigma`, the form of k-diffusion's
    ``sample_ipndm``):

    .. math:: x_{i+1} = \frac{\alpha_{i+1}}{\alpha_i}x_i
              + \alpha_{i+1}(s_{i+1}-s_i)\sum_{j<k_i} b^{(k_i)}_j\hat\epsilon^{(i-j)},

    :math:`b^{(1)} = [1]`, :math:`b^{(2)} = [3, -1]/2`, :math:`b^{(3)} = [23, -16, 5]/12`,
    :math:`b^{(4)} = [55, -59, 37, -9]/24`, :math:`k_i = \min(\text{order}, i+1)` (the
    lower-order warm-up).  The weights ignore the step sizes: on an arbitrary grid the method
    is only first order; on a grid that is a smooth map of a uniform one (every standard
    schedule) the step ratios are :math:`1 + O(h)`, the local error :math:`O(h^3)` for
    k >= 2, and the **global order is 2** (1 for ``order=1``, Euler in s).

    **Options:** ``order`` in 1..4 (default 4).  **NFE per step:** 1 (nfe == steps).
    """

    max_order: ClassVar[int] = 4
    order: int = 4

    @property
    def expected_order(self) -> int:
        """The global order on a smoothly mapped grid: 1 for ``order=1``, else 2."""
        return 1 if self.order == 1 else 2

    def weights(self, sde: SDE, tab: StepTable) -> list[list[float]]:
        s = (-tab.lam64).exp().tolist()                      # sigma / alpha
        alpha = tab.alpha64.tolist()
        return [[alpha[i + 1] * (s[i + 1] - s[i]) * b for b in AB_WEIGHTS[k]]
                for i, k in enumerate(tab.orders)]
