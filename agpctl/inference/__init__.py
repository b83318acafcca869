"""Inference on trained runs: scoring datasets, ``agpctl eval``, ``predict`` (local and on Ray), ``export``."""
