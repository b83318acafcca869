"""What ``agpctl serve`` runs: one plain dataclass, each command-line flag one field, checked
before Ray starts. Ray-free: the replicas receive it as it is."""

from __future__ import annotations

from dataclasses import dataclass, field

from agpctl.errors import UserError
from agpctl.inference.serve_http import ServeLimits
from agpctl.inference.thresholds import check_threshold_options


@dataclass
class ServeConfig:
    run: str  # run directory or s3:// URI (local paths made absolute before Ray sees them)
    category: str | None = None  # a per-category run's model / a multi-class run's fixed category
    threshold: str = "auto"
    pixel_threshold: float | None = None
    address: str | None = None  # as `agpctl train --address`; None: embedded local Ray
    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int | None = None  # a fixed number of replicas (default 1 unless min/max are given)
    min_replicas: int | None = None  # autoscaling bounds
    max_replicas: int | None = None
    gpus_per_replica: float | None = None  # None: the cluster's GPUs shared by the most replicas, at most 1 each
    cpus_per_replica: float | None = None  # None: the embedded Ray's CPUs shared by the replicas; 1 on a cluster
    max_batch_size: int = 16  # images per model call
    batch_wait_ms: float = 10.0  # how long a batch waits to fill
    limits: ServeLimits = field(default_factory=ServeLimits)
    s3_endpoint: str | None = None

    def check(self) -> None:
        """The first value that cannot work, as a one-line UserError naming its flag."""
        check_threshold_options(self.threshold, self.pixel_threshold)
        problems = list(self.limits.problems())
        if not 1 <= self.port <= 65535:
            problems.append(f"--port must be between 1 and 65535, got {self.port}")
        if not self.host:
            problems.append("--host must name an address to listen on, e.g. 127.0.0.1 or 0.0.0.0")
        if self.replicas is not None and (self.min_replicas is not None or self.max_replicas is not None):
            problems.append("give either --replicas N (fixed) or --min-replicas/--max-replicas (autoscaling), not both")
        for flag, value in (("--replicas", self.replicas), ("--min-replicas", self.min_replicas),
                            ("--max-replicas", self.max_replicas), ("--max-batch-size", self.max_batch_size)):
            if value is not None and value < 1:
                problems.append(f"{flag} must be at least 1, got {value}")
        low, high = self.replica_bounds()
        if low > high:
            problems.append(f"--min-replicas {low} is more than --max-replicas {high}")
        if self.batch_wait_ms < 0:
            problems.append(f"--batch-wait-ms must be 0 or more, got {self.batch_wait_ms:g}")
        for flag, value in (("--gpus-per-replica", self.gpus_per_replica), ("--cpus-per-replica", self.cpus_per_replica)):
            if value is not None and value < 0:
                problems.append(f"{flag} must be 0 or more, got {value:g}")
        if problems:
            raise UserError(problems[0])

    def replica_bounds(self) -> tuple[int, int]:
        """(fewest, most) replicas: equal for a fixed number."""
        if self.replicas is not None:
            return self.replicas, self.replicas
        low = self.min_replicas if self.min_replicas is not None else 1
        high = self.max_replicas if self.max_replicas is not None else max(low, 1)
        return low, high

    @property
    def autoscaling(self) -> bool:
        low, high = self.replica_bounds()
        return low != high
