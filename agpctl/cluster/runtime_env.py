"""What travels with work sent to Ray: this code and the non-secret environment.

Endpoints and cache locations travel; credentials never do — the cluster's machines use
their own standard credential chain.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

PACKAGES = ("agpctl", "agp_models", "agp_data", "tuning")
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION", "AGP_CACHE_DIR", "AGP_CACHE_MAX_GB",
                 "MLFLOW_EXPERIMENT_NAME")


def forwarded_env() -> dict[str, str]:
    """The variables of :data:`FORWARDED_ENV` that are set here."""
    return {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}


def package_dirs() -> list[str]:
    """The folders of this project's packages, shipped so the cluster runs the code you have."""
    return [os.path.dirname(importlib.import_module(name).__file__) for name in PACKAGES]


def client_runtime_env() -> dict[str, Any]:
    """Ray Client: the driver is here, the work there; ship the code and the environment."""
    return {"py_modules": package_dirs(), "env_vars": forwarded_env()}


def job_runtime_env(workdir: str) -> dict[str, Any]:
    """Ray Jobs: the job's working directory (its files), the code and the environment."""
    return {"working_dir": workdir, "py_modules": package_dirs(), "env_vars": forwarded_env()}


def worker_runtime_env() -> dict[str, Any]:
    """Ray Train workers: the environment only (the code is already where the driver is)."""
    env = forwarded_env()
    return {"env_vars": env} if env else {}
