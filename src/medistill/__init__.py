"""medistill: distil large medical image classifiers into small, fast, explainable students.

The Python API is :mod:`medistill.api` (``from medistill.api import train, distill``); the
``medistill`` command line calls the same engine.
"""

__version__ = "0.1.0"
