"""agpctl: the application layer (config, Ray Train jobs, evaluation, prediction, CLI)."""

__version__ = "0.1.0"
