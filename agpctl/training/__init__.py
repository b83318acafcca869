"""Training: pre-flight checks, the driver that launches a Ray Train job, the per-worker
loop, the step loop, exact sharding and live progress."""
