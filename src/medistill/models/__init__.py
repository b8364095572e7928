"""Model factory, feature taps and cost measurement."""

from medistill.models.cnn5 import CNN5
from medistill.models.cost import count_flops, count_params, latency_ms
from medistill.models.factory import (ModelSpecRecord, Preprocess, create_model, load_model_dir, load_weights,
                                      read_state_dict, save_model_dir)
from medistill.models.taps import FeatureTaps, list_taps

__all__ = ["CNN5", "FeatureTaps", "ModelSpecRecord", "Preprocess", "count_flops", "count_params", "create_model",
           "latency_ms", "list_taps", "load_model_dir", "load_weights", "read_state_dict", "save_model_dir"]
