"""Loss terms: a registry of named terms (``base``) and the terms themselves, registered by the
package when it is imported — supervised, logit, feature, UMKD (SFA, CFA, UDD) and ScaleKD.
A new term is a class in one of these modules (or a new one imported here) decorated with
``@register("name")``; its functional core goes in :mod:`medistill.losses`."""

from medistill.distill.terms.base import (
    TERMS,
    LossTerm,
    Params,
    TermSetup,
    make_term,
    make_term_unbuilt,
    register,
)
from medistill.distill.terms import feature, logit, scalekd, supervised, umkd  # noqa: F401  (register the terms)
from medistill.distill.terms.feature import ATTerm, FitNetTerm, NDTerm
from medistill.distill.terms.logit import DKDTerm, HybridTerm, KDTerm, PeerTerm, SoftCETerm
from medistill.distill.terms.supervised import CETerm, FocalTerm, LogitAdjustedTerm

__all__ = ["TERMS", "LossTerm", "Params", "TermSetup", "make_term", "make_term_unbuilt", "register", "ATTerm",
           "FitNetTerm", "NDTerm", "DKDTerm", "HybridTerm", "KDTerm", "PeerTerm", "SoftCETerm", "CETerm", "FocalTerm",
           "LogitAdjustedTerm"]
