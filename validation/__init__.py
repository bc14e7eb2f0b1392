"""validation: every solver against exact answers (the project's main job: ``python -m validation``),
and :func:`on_model`: every deterministic solver on your own network against its pf_ode reference
(``scoresde validate --checkpoint PATH --out DIR``)."""
from .model_check import on_model

__all__ = ["on_model"]
