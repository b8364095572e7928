"""Imbalance-aware metrics and evaluation writers."""

from medistill.eval.metrics import classification_metrics, selection_score
from medistill.eval.predict import evaluate_splits, predict, predictions_csv

__all__ = ["classification_metrics", "evaluate_splits", "predict", "predictions_csv", "selection_score"]
