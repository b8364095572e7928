"""Distillation engine: participants, loss terms, teacher cache, the training loop."""

from medistill.distill.context import StepContext
from medistill.distill.engine import Engine
from medistill.distill.participants import Participant
from medistill.distill.terms import TERMS, LossTerm, TermSetup, make_term, register

__all__ = ["Engine", "LossTerm", "Participant", "StepContext", "TERMS", "TermSetup", "make_term", "register"]
