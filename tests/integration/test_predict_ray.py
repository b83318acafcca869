"""``agpctl predict --workers 2`` on an embedded local Ray: the sharded tables equal a local
predict (moved from tests/unit/agpctl/test_predict.py: it starts Ray)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from agpctl.cli import cli
from agpctl.inference.predict import run_predict
from helpers import PREDICT_INPUTS as READABLE  # (file name, (width, height)) written by `image_folder`
from helpers import read_csv


@pytest.mark.slow
def test_sharded_predict_on_ray_equals_local_predict(trained_run, image_folder, tmp_path):
    """--workers 2 on the embedded Ray: two tasks score halves of the inputs; the gathered
    tables list every image once, in input order, with the local scores."""
    local = run_predict(image_folder, trained_run, str(tmp_path / "local"), recursive=True, write_images=False)
    out = str(tmp_path / "sharded")
    result = CliRunner().invoke(cli, ["predict", image_folder, "--run", trained_run, "--out", out, "--recursive",
                                      "--workers", "2", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{"):])
    assert summary["model"]["workers"] == 2
    assert summary["summary"]["images"] == len(READABLE) and summary["summary"]["skipped"] == 1
    rows = read_csv(os.path.join(out, "predictions.csv"))
    assert [r["path"] for r in rows] == [r["path"] for r in local.rows]
    np.testing.assert_allclose([float(r["score"]) for r in rows], [r["score"] for r in local.rows], rtol=1e-5)
    for row in rows:  # each task wrote its own images' files
        with Image.open(row["heatmap"]) as heat:
            assert heat.size == (int(row["width"]), int(row["height"]))
