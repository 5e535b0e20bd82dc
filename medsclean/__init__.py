"""medsclean: find the defective images hidden in an anomaly-detection training set (MeDS)."""

__version__ = "0.1.0"
