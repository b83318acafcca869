"""The embedded Ray with its dashboard, which starts only when asked (``--dashboard``): its
address is announced on stderr and it answers there while the command runs. (Without it,
the default, every other integration test runs.)"""

from __future__ import annotations

import re
import urllib.error
import urllib.request

import pytest

from agpctl.cluster.connect import ray_session

pytestmark = pytest.mark.slow


def test_an_asked_for_dashboard_is_announced_and_answers(capsys):
    with ray_session(None, num_cpus=1, dashboard=True):
        err = capsys.readouterr().err
        match = re.search(r"Ray dashboard: (http://127\.0\.0\.1:\d+) ", err)
        assert match, err
        # Ray's token authentication (on by default for local clusters) may ask for the token:
        # an answer either way is a dashboard serving there.
        try:
            with urllib.request.urlopen(f"{match.group(1)}/api/version", timeout=30) as answer:
                status = answer.status
        except urllib.error.HTTPError as refused:
            status = refused.code
        assert status in (200, 401)
