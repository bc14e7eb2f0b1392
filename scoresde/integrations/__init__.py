"""Bridges from other diffusion libraries' networks to :class:`scoresde.ScoreModel`.

- :mod:`scoresde.integrations.diffusers`: a diffusers UNet and its scheduler become a
  ScoreModel over :class:`scoresde.DiscreteVPSDE`; the scheduler's own grid and options map
  to ``solvers.sample`` arguments that reproduce diffusers' loop.
- :mod:`scoresde.integrations.kdiffusion`: a k-diffusion / EDM denoiser ``D(x, sigma)``
  becomes a ScoreModel over :class:`scoresde.EDMSDE`.

The submodules import their peer library lazily: ``import scoresde`` never needs them.
"""
