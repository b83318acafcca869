"""The embedded Ray's start-up options and the one-line messages for addresses that answer
nothing (agpctl.cluster.connect), without starting Ray."""

from __future__ import annotations

import socket

import pytest

from agpctl.cluster.connect import check_reachable, embedded_ray_options
from agpctl.errors import UserError


def test_the_embedded_ray_starts_without_a_dashboard_unless_asked():
    options = embedded_ray_options(num_cpus=2)
    assert options["include_dashboard"] is False and options["num_cpus"] == 2
    assert "dashboard_port" not in options and options["runtime_env"] is None
    assert options["_node_ip_address"] == "127.0.0.1"


def test_an_asked_for_dashboard_gets_its_own_port_and_every_worker_is_told():
    options = embedded_ray_options(num_cpus=1, dashboard=True, runtime_env={"env_vars": {"A": "1"}, "pip": []})
    port = options["dashboard_port"]
    assert options["include_dashboard"] is True and options["dashboard_host"] == "127.0.0.1"
    assert options["runtime_env"] == {"env_vars": {"A": "1", "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"},
                                      "pip": []}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_local_address_that_answers_nothing_says_how_to_get_a_jobs_api():
    with pytest.raises(UserError) as raised:
        check_reachable(f"http://127.0.0.1:{closed_port()}")
    message = str(raised.value)
    assert "\n" not in message and "cannot reach Ray" in message
    assert "--dashboard" in message and "ray start --head" in message
