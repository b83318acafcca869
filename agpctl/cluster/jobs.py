"""Ray Jobs: run `agpctl train` (or `predict`) on a remote cluster from a laptop.

`agpctl train --address http://HOST:8265 …` resolves the run configuration here, then
submits `agpctl` itself as the job's entrypoint. The job's runtime_env carries this very
package (so the cluster runs the code you have) and the non-secret environment the job
needs, such as the S3 endpoint. Credentials are never put on a command line or into the
runtime_env: the cluster's machines use their own standard credential chain.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import tempfile
import time
from typing import Any

from agpctl.cluster.connect import check_reachable, use_token_if_available
from agpctl.cluster.runtime_env import job_runtime_env
from agpctl.config import RunConfig
from agpctl.errors import UserError, first_line
from agpctl.runs import default_run_name, run_uri_for

AGENT_WAIT_S = 90


def client(address: str):
    check_reachable(address)
    use_token_if_available()
    from ray.job_submission import JobSubmissionClient  # deferred: after the token set-up (see agpctl.cluster)

    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # the SDK raises plain exceptions for auth and version problems
        raise UserError(f"cannot use Ray Jobs at {address}: {first_line(exc)}") from None


def submit_command(address: str, args: list[str], *, files: dict[str, str] | None = None,
                   metadata: dict[str, str] | None = None) -> tuple[Any, str]:
    """Submits ``agpctl ARGS`` as a Ray job; ``files`` are written into its working directory.
    Returns (client, job id)."""
    jobs = client(address)
    with tempfile.TemporaryDirectory(prefix="agp-job-") as workdir:
        for name, text in (files or {}).items():
            with open(os.path.join(workdir, name), "w") as fh:
                fh.write(text)
        entrypoint = shlex.join(["python", "-m", "agpctl.cli", *args])
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                job_id = jobs.submit_job(entrypoint=entrypoint, runtime_env=job_runtime_env(workdir),
                                         metadata=metadata or {})
                return jobs, job_id
            except Exception as exc:
                # A freshly started head node answers before its job agent is up.
                if "No available agent" in str(exc) and time.monotonic() < deadline:
                    time.sleep(2)
                    continue
                raise UserError(f"Ray Jobs at {address} refused the submission: {first_line(exc)}") from None


def submit_training(cfg: RunConfig, address: str, resume: str | None = None) -> tuple[Any, str, str]:
    """Submits the run; returns (client, job id, where results land)."""
    job_cfg = RunConfig.from_dict(cfg.to_dict())
    job_cfg.cluster.address = "auto"  # inside the job: the cluster it runs on
    job_cfg.storage.name = job_cfg.storage.name or default_run_name(job_cfg)
    args = ["train", "--config", "run.yaml", *(["--resume", resume] if resume else [])]
    jobs, job_id = submit_command(address, args, files={"run.yaml": job_cfg.to_yaml()},
                                  metadata={"agp_run": job_cfg.storage.name})
    where = resume or (job_cfg.storage.out if "://" in job_cfg.storage.out else
                       f"{job_cfg.storage.out}/{job_cfg.storage.name} (on the cluster)")
    if "://" in job_cfg.storage.out and not resume:
        where = run_uri_for(job_cfg.storage.out, job_cfg.storage.name)
    return jobs, job_id, where


def follow_logs(jobs, job_id: str, write) -> str:
    """Streams the job's logs until it ends; returns its final status."""

    async def tail() -> None:
        async for chunk in jobs.tail_job_logs(job_id):
            write(chunk)

    asyncio.run(tail())
    status = jobs.get_job_status(job_id)
    return str(getattr(status, "value", status))
