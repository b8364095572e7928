"""Explanations of teachers and students: CAMs, average feature maps, faithfulness, agreement."""

from medistill.explain.cam import (average_feature_maps, default_target_layer, grad_cam, grad_cam_pp, layer_cam,
                                   score_cam, tokens_to_map)
from medistill.explain.metrics import (confidence_change, deletion_auc, insertion_auc,
                                       map_agreement, per_class, prediction_fidelity)

__all__ = ["average_feature_maps", "confidence_change", "default_target_layer", "deletion_auc", "grad_cam",
           "grad_cam_pp", "insertion_auc", "layer_cam", "map_agreement", "per_class",
           "prediction_fidelity", "score_cam", "tokens_to_map"]
