"""Connecting to Ray: an embedded local instance by default, or a remote cluster.

The embedded instance binds to 127.0.0.1 only and is shut down when the command ends. Its
dashboard starts only when asked (``--dashboard``; Ray then keeps a minimal head process):
the dashboard's modules, several of them processes of their own, took 1.5 s of every
command's ``ray.init`` on an idle 2-core machine (benchmarks/startup.py), more under load,
and nothing of agp's embedded runs needs them.
Ray's token authentication is left as Ray configures it: the token is read by Ray itself
from ``RAY_AUTH_TOKEN`` or its standard file and never printed here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
from urllib.parse import urlparse

from agpctl.cluster.runtime_env import client_runtime_env
from agpctl.console import err_console
from agpctl.errors import UserError, first_line

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def address_kind(address: str | None) -> str:
    """'local' (embedded), 'client' (ray://), 'jobs' (http(s)://) or 'cluster' (host:port / auto);
    an address of none of these forms is the user's mistake."""
    if not address:
        return "local"
    if address.startswith("ray://"):
        kind = "client"
    elif address.startswith(("http://", "https://")):
        kind = "jobs"
    elif address == "auto":
        return "cluster"
    elif "://" in address:
        raise UserError(f"--address {address}: use ray://HOST:10001 (Ray Client), http://HOST:8265 (Ray Jobs), "
                        "HOST:PORT or auto")
    else:
        kind = "cluster"
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    try:
        port = parsed.port
    except ValueError:
        port = None
    if not parsed.hostname or (kind == "cluster" and port is None) or (port is None and ":" in parsed.netloc):
        raise UserError(f"--address {address}: expected a host and port, e.g. ray://head:10001, http://head:8265 or head:6379")
    return kind


def use_token_if_available() -> None:
    """Current Ray clusters require a token; Ray's clients only send one when
    ``RAY_AUTH_MODE=token``. Turn that on when a token is at hand (``RAY_AUTH_TOKEN``,
    ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``). Must run before Ray reads its config."""
    if os.environ.get("RAY_AUTH_MODE"):
        return  # the user decided
    token_file = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or os.path.isfile(token_file):
        os.environ["RAY_AUTH_MODE"] = "token"


def check_reachable(address: str) -> None:
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    host, port = parsed.hostname, parsed.port
    if not host or not port:
        return
    try:
        with socket.create_connection((host, port), timeout=5):
            pass
    except OSError as exc:
        hint = "check the address and that the cluster is up"
        if host in LOOPBACK_HOSTS:
            # the embedded Ray of another agpctl command is not a cluster one can reach later
            hint += ("; an embedded Ray (a command without --address) lives only while its command runs and "
                     "serves the dashboard and Jobs API only with --dashboard; for `agpctl jobs` start a "
                     "cluster with `ray start --head` and pass --address to it")
        raise UserError(f"cannot reach Ray at {address} ({exc.strerror or exc}); {hint}") from None


def free_local_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def embedded_ray_options(num_cpus: int | None = None, dashboard: bool = False,
                         runtime_env: dict | None = None) -> dict:
    """``ray.init`` arguments of the embedded local instance.

    With the dashboard, it gets a port of its own and every worker is told it
    (``RAY_API_SERVER_ADDRESS``): Ray's state API, which Ray Train's placement-group cleaner
    asks whether a stopped run's controller is alive, otherwise looks for "the" local Ray and
    fails on a machine running several (shared machines, parallel test runs)."""
    options: dict = {"num_cpus": num_cpus or os.cpu_count() or 1, "include_dashboard": dashboard,
                     "_node_ip_address": "127.0.0.1", "runtime_env": runtime_env}
    if dashboard:
        port = free_local_port()
        env = dict(runtime_env or {})
        env["env_vars"] = {**env.get("env_vars", {}), "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}
        options.update(dashboard_host="127.0.0.1", dashboard_port=port, runtime_env=env)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return options


@contextlib.contextmanager
def ray_session(address: str | None, num_cpus: int | None = None, runtime_env: dict | None = None,
                dashboard: bool = False):
    """``ray.init`` for the duration of a command; shuts down only what it started.
    ``dashboard``: the embedded instance starts Ray's dashboard too and prints its address."""
    if address_kind(address) != "local":
        use_token_if_available()  # before Ray reads its configuration
    import ray  # deferred: after the token set-up above (see agpctl.cluster)

    if ray.is_initialized():  # e.g. inside a Ray job or a Tune trial: use what is there
        yield ray
        return
    kind = address_kind(address)
    if kind == "jobs":
        raise UserError(f"{address} is a Ray Jobs address; it is used through job submission, not ray.init")
    kwargs: dict = {"logging_level": "WARNING", "log_to_driver": False, "runtime_env": runtime_env}
    if kind == "local":
        kwargs.update(embedded_ray_options(num_cpus, dashboard, runtime_env))
    else:
        check_reachable(address)
        kwargs["address"] = address
        if kind == "client" and runtime_env is None:
            kwargs["runtime_env"] = client_runtime_env()
    silence_token_announcement()
    try:
        context = ray.init(**kwargs)
    except ConnectionError as exc:
        raise UserError(f"cannot connect to Ray at {address}: {first_line(exc)}") from None
    except RuntimeError as exc:
        message = first_line(exc)
        if "version" in message.lower():
            raise UserError(f"Ray version mismatch with {address}: {message}; install the cluster's Ray version here") from None
        if "auth" in message.lower() or "token" in message.lower():
            raise UserError(f"Ray at {address} refused authentication; set RAY_AUTH_TOKEN or ~/.ray/auth_token to the cluster's token") from None
        raise
    if kind == "local" and dashboard:
        announce_dashboard(context)
    try:
        with sigterm_as_interrupt():
            yield ray
    finally:
        ray.shutdown()


def announce_dashboard(context) -> None:
    """The embedded dashboard's address, on stderr (stdout may be --json)."""
    url = getattr(context, "dashboard_url", None)
    if url:
        err_console.print(f"Ray dashboard: http://{url} (while this command runs)", highlight=False)


class _AnnouncementFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Token authentication is enabled" not in record.getMessage()


TOKEN_SETUP_LOGGER = "ray._private.authentication.authentication_token_setup"


def silence_token_announcement() -> None:
    """Ray announces its (default-on) token authentication at every start, whatever the
    log level asked for; the token itself is never printed, the line is noise for our users."""
    logger = logging.getLogger(TOKEN_SETUP_LOGGER)
    if not any(isinstance(f, _AnnouncementFilter) for f in logger.filters):
        logger.addFilter(_AnnouncementFilter())


class Terminated(KeyboardInterrupt):
    """SIGTERM (sent by `timeout`, Kubernetes, Slurm), handled as Ctrl-C is."""


@contextlib.contextmanager
def sigterm_as_interrupt():
    """While Ray runs in this process, SIGTERM stops the command the way Ctrl-C does.

    Ray's driver installs a native SIGTERM handler that dumps stacks and aborts (exit 134),
    skipping every ``finally``; this one raises :class:`Terminated` (a KeyboardInterrupt) in
    the main thread instead, so workers are stopped, checkpoints kept and the resume command
    printed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def local_cpu_share(cluster_cpus: float, consumers: int) -> float:
    """CPUs each of ``consumers`` concurrent workers or tasks reserves on the embedded Ray:
    the machine shared evenly (a laptop run uses every core), at least 1."""
    return float(max(1, int(cluster_cpus // max(1, consumers))))


def use_assigned_cpus() -> None:
    """Inside a Ray worker or task: torch's intra-op threads follow the CPUs Ray reserved for
    it (Ray itself caps them at 1 otherwise)."""
    import ray  # deferred: see agpctl.cluster
    import torch  # deferred: `agpctl data` and `jobs` never need it

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    if cpus:
        torch.set_num_threads(max(1, int(cpus)))
