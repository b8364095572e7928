"""medistill: distil large medical image classifiers into small, fast, explainable students."""

__version__ = "0.1.0"
