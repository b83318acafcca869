"""``agpctl serve`` on Ray: the run checked here, then a Ray Serve application (one ingress
deployment, :class:`~agpctl.inference.serve_replica.DetectorService`) on the embedded Ray or a
cluster, kept until Ctrl-C or SIGTERM, then taken down: Serve itself on the embedded Ray, only
this application on a cluster (others may serve there too).
"""

from __future__ import annotations

import errno
import json
import logging
import math
import socket
import time
import urllib.error
import urllib.request
from dataclasses import replace
from typing import Any, Callable

from agp_data import storage
from agpctl import runs
from agpctl.cluster.connect import address_kind, local_cpu_share, ray_session
from agpctl.errors import UserError, remote_error_line, user_error_from_remote
from agpctl.inference.detection import check_category
from agpctl.inference.serve_options import ServeConfig
from agpctl.inference.serve_replica import DetectorService
from agpctl.inference.thresholds import is_auto, resolve_thresholds
from agpctl.paths import absolute

APP_NAME = "agp"
DEPLOYMENT_NAME = "detector"
READY_TIMEOUT_S = 60.0
GPU_SHARE_UNITS = 10_000
# A replica that fails to load the run fails again: report it after a few tries, not Serve's 20.
CONSTRUCTOR_RETRIES = 3


def check_run(config: ServeConfig, on_warning: Callable[[str], None] | None = None) -> ServeConfig:
    """The config with an absolute run path, once the run is known to load (config,
    checkpoint, thresholds, category): a mistake fails here, in one line, before Ray starts.
    Replicas load the run again (on a cluster, from their own machines)."""
    config.check()
    storage.configure_s3(config.s3_endpoint)
    run = absolute(config.run)
    if address_kind(config.address) == "client" and not storage.is_s3(run) and on_warning is not None:
        on_warning(f"{run}: the cluster's machines must see this path too (use an s3:// URI unless they share "
                   "a file system with this one)")
    model_uri = runs.select_model_run(run, config.category)
    # Read once here too: an unreadable checkpoint fails in a line now, not after Ray and Serve start.
    for skipped in runs.load_latest_checkpoint(model_uri).skipped:
        if on_warning is not None:
            on_warning(f"skipped unreadable checkpoint {skipped}; the service uses an older one")
    stored = runs.stored_thresholds(model_uri)
    if is_auto(config.threshold) and stored is not None:  # else the replicas read them from the checkpoint
        resolve_thresholds(stored, config.threshold, config.pixel_threshold)
    check_category(config.category, runs.stored_categories(model_uri) or [], model_uri)
    if address_kind(config.address) != "local" and config.host in ("127.0.0.1", "localhost") and on_warning:
        on_warning(f"--host {config.host}: the service is reachable only on the cluster's own machines; "
                   "pass --host 0.0.0.0 to reach it from elsewhere")
    return replace(config, run=run, s3_endpoint=storage.s3_endpoint())


def check_port_free(host: str, port: int) -> None:
    """One line instead of a proxy that cannot bind: the port is taken, or the host is not ours."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As the HTTP server will: a port whose old connections linger in TIME_WAIT is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UserError(f"port {port} on {host} is in use; stop what listens there or pick another --port") from None
            raise UserError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); check --host and --port") from None


def resolved_resources(config: ServeConfig, cluster: dict[str, float], remote: bool) -> ServeConfig:
    """GPUs and CPUs per replica as the cluster allows, where the user left them open: the
    cluster's GPUs shared by the most replicas (at most one each). On the embedded Ray, fixed
    replicas that need more GPUs than the machine has would wait for them forever: a UserError
    instead (a remote cluster may add GPU nodes when asked)."""
    low, high = config.replica_bounds()
    cluster_gpus = float(cluster.get("GPU", 0.0))
    gpus = config.gpus_per_replica
    if gpus is None:
        # Ray counts GPU shares in units of 1/10000: rounded down, the shares never add up to more than the GPUs.
        gpus = math.floor(min(1.0, cluster_gpus / high) * GPU_SHARE_UNITS) / GPU_SHARE_UNITS
    elif not remote and low == high and low * gpus > cluster_gpus + 1e-9:
        fitting = math.floor(cluster_gpus / low * GPU_SHARE_UNITS) / GPU_SHARE_UNITS
        raise UserError(f"--replicas {low} with --gpus-per-replica {gpus:g} need {low * gpus:g} GPUs but this "
                        f"machine has {cluster_gpus:g}; lower one of them (e.g. --gpus-per-replica {fitting:g})")
    cpus = config.cpus_per_replica
    if cpus is None:
        cpus = 1.0 if remote else local_cpu_share(cluster.get("CPU", 1), high)
    return replace(config, gpus_per_replica=gpus, cpus_per_replica=cpus)


def deployment_options(config: ServeConfig) -> dict[str, Any]:
    """Serve's options for the detector deployment: replicas (fixed or autoscaled), resources,
    and enough requests in flight per replica to fill two batches."""
    low, high = config.replica_bounds()
    scaling: dict[str, Any]
    if config.autoscaling:
        # A replica with a full batch waiting is busy: add replicas beyond that.
        scaling = {"autoscaling_config": {"min_replicas": low, "max_replicas": high,
                                          "target_ongoing_requests": config.max_batch_size}}
    else:
        scaling = {"num_replicas": low}
    return {
        "name": DEPLOYMENT_NAME,
        "ray_actor_options": {"num_cpus": config.cpus_per_replica, "num_gpus": config.gpus_per_replica},
        "max_ongoing_requests": 2 * config.max_batch_size,
        "max_constructor_retry_count": CONSTRUCTOR_RETRIES,
        **scaling,
    }


def application(config: ServeConfig):
    """The Serve application of ``config`` (resources resolved)."""
    from ray import serve  # deferred: see agpctl.cluster

    return serve.deployment(DetectorService, **deployment_options(config)).bind(config)


def service_url(config: ServeConfig) -> str:
    host = config.host
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if address_kind(config.address) == "local" else "<any node>"
    return f"http://{'[' + host + ']' if ':' in host else host}:{config.port}"


def serve_forever(config: ServeConfig, on_ready: Callable[[str, dict[str, Any]], None],
                  on_warning: Callable[[str], None] | None = None) -> None:
    """Serve ``config`` until Ctrl-C or SIGTERM (then return normally, everything taken down).
    ``on_ready(url, info)`` runs once the service answers; ``info`` is its ``GET /info``."""
    kind = address_kind(config.address)
    if kind == "jobs":
        raise UserError(f"{config.address} is a Ray Jobs address: `agpctl serve` submits itself as a job there")
    config = check_run(config, on_warning)
    if kind == "local":
        check_port_free(config.host, config.port)
    with ray_session(config.address) as ray:
        from ray import serve  # deferred: after ray_session's token set-up

        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # Serve's start-up chatter
        config = resolved_resources(config, ray.cluster_resources(), remote=kind != "local")
        deployed = False
        try:
            serve.start(http_options={"host": config.host, "port": config.port},
                        proxy_location="HeadOnly" if kind == "local" else "EveryNode")
            handle = _deploy(serve, config)
            deployed = True
            info = handle.info.remote().result()
            url = service_url(config)
            if kind == "local":
                wait_until_answering(url)
            on_ready(url, info)
            while True:
                time.sleep(1.0)  # the signal handlers interrupt this
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (agpctl.cluster.connect.Terminated)
            pass
        finally:
            _take_down(serve, kind, deployed)


def _deploy(serve, config: ServeConfig):
    try:
        return serve.run(application(config), name=APP_NAME, route_prefix="/")
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - Serve reports a replica's failure in its own types
        raise startup_error(serve, exc) from None


def startup_error(serve, exc: BaseException) -> UserError:
    """Why the application did not start, in one line: serve.run only says that it failed; the
    replica's own exception (e.g. an unreadable checkpoint) is in the deployment's status."""
    try:
        deployments = serve.status().applications[APP_NAME].deployments.values()
        details = [d.message for d in deployments if d.message]
    except Exception:  # noqa: BLE001 - no status to be had: say what serve.run said
        details = []
    for text in [*details, str(exc)]:
        known = user_error_from_remote(RuntimeError(text))
        if known is not None:
            return known
    reason = remote_error_line(RuntimeError(details[0])) if details else remote_error_line(exc)
    return UserError(f"the service did not start: {reason}")


def _take_down(serve, kind: str, deployed: bool) -> None:
    """Serve drains requests in flight, then stops. On the embedded Ray, a deployment that never
    started is left to ray.shutdown: Serve's controller, still retrying it, would complain."""
    try:
        if kind != "local":
            serve.delete(APP_NAME)
        elif deployed:
            serve.shutdown()
    except KeyboardInterrupt:
        pass  # asked twice: Ray's own shutdown (ray_session) still stops the rest


def wait_until_answering(url: str, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Serve reports the application running before its HTTP proxy may accept connections."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as answer:
                if answer.status == 200 and json.loads(answer.read()).get("status") == "ok":
                    return
        except (urllib.error.URLError, OSError, ValueError) as exc:
            last = str(getattr(exc, "reason", exc))
        time.sleep(0.2)
    raise UserError(f"the service started but {url}/health does not answer ({last}); check --host and --port")
