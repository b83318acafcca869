"""Shared pytest fixtures.

- ``s3_server``: a real S3 API (moto's server) on 127.0.0.1 for the whole session, with fake
  credentials and ``AWS_ENDPOINT_URL`` set in the environment while it runs.
- ``s3_bucket``: a fresh, empty bucket on that server for one test.
- ``generated_dataset``: a tiny generated MVTec-layout dataset (2 categories, 8 train + 6 test
  per category, 64 px), written once per session.
- ``agp_cache_dir``: an isolated ``$AGP_CACHE_DIR`` for one test.
- ``one_torch_thread``: one intra-op torch thread for a module.

Helpers shared by test modules live in ``tests/helpers.py``; ``import helpers`` works from
every sub-folder because this file puts ``tests/`` on ``sys.path``.
"""

from __future__ import annotations

import os
import sys
import uuid

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)
# tests/ for ``import helpers``. The repository root too: pytest's "prepend" import mode puts
# the test folders on sys.path, and tests/unit/ holds folders named like the packages
# (agpctl/, tuning/ ...); with the real packages reachable on sys.path, Python always picks
# them (a regular package wins over a same-named folder without __init__.py).
for _path in (TESTS_DIR, REPO_ROOT):
    if _path not in sys.path:
        sys.path.insert(0, _path)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """Start moto's S3 server on a free local port; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    no_aws_config = str(tmp_path_factory.mktemp("no-aws-config") / "absent")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.setenv("AWS_ENDPOINT_URL", endpoint)
        # Keep the developer's own AWS setup out of the tests.
        env.setenv("AWS_CONFIG_FILE", no_aws_config)
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", no_aws_config)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
            env.delenv(name, raising=False)
        try:
            yield endpoint
        finally:
            server.stop()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A new empty bucket on the session's S3 server; yields its name."""
    import boto3

    name = f"agp-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def generated_dataset(tmp_path_factory) -> str:
    """Path of a tiny generated dataset (fabric and metal; 8 train, 6 test each; 64 px)."""
    from agp_data.generate import generate_dataset

    out = tmp_path_factory.mktemp("generated") / "data"
    return generate_dataset(str(out), categories=2, train=8, test=6, size=64, seed=0)


@pytest.fixture
def agp_cache_dir(tmp_path, monkeypatch) -> str:
    """An isolated $AGP_CACHE_DIR for one test."""
    path = tmp_path / "agp-cache"
    monkeypatch.setenv("AGP_CACHE_DIR", str(path))
    return os.fspath(path)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a module: on shared busy cores several threads spin and
    run many times slower than one (measured: 73 s vs 10 s for AGPNet's training test)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def trained_run(generated_dataset, tmp_path_factory) -> str:
    """A tiny AGPNet run (1 epoch) on ``generated_dataset``, trained in this process once per
    session. Tests read it and never change it."""
    import helpers

    run_uri = str(tmp_path_factory.mktemp("trained-runs") / "tiny")
    helpers.run_in_process(helpers.tiny_config(generated_dataset, epochs=1), run_uri)
    return run_uri


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> str:
    """A folder of real-world image quirks for predict (see ``helpers.write_predict_inputs``)."""
    import helpers

    return helpers.write_predict_inputs(tmp_path_factory.mktemp("inputs"))
