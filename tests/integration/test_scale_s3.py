"""Two DDP workers reading a dataset from, and writing the run to, a real S3-compatible
server on 127.0.0.1; the distributed final evaluation equals a single-process `agpctl eval`."""

from __future__ import annotations

import json
import os

import boto3
import pytest

from agp_data import storage
from helpers import TINY_AGPNET, agpctl

pytestmark = pytest.mark.slow


def test_two_workers_train_from_and_to_s3_and_eval_reproduces(s3_server, s3_bucket, generated_dataset):
    storage.configure_s3(s3_server)
    data_uri = f"s3://{s3_bucket}/datasets/tiny"
    storage.upload_dir(generated_dataset, data_uri)
    out = f"s3://{s3_bucket}/runs"
    env = {**os.environ, "AWS_ENDPOINT_URL": s3_server}
    train = agpctl("train", "--dataset", "mvtec", "--root", data_uri, "--out", out, "--name", "ddp",
                   "--workers", "2", "--epochs", "2", "--json", *TINY_AGPNET, timeout=500, env=env)
    assert train.returncode == 0, train.stderr[-3000:]
    outcome = json.loads(train.stdout)
    keys = {o["Key"] for o in boto3.client("s3", endpoint_url=s3_server).list_objects_v2(
        Bucket=s3_bucket, Prefix="runs/ddp/")["Contents"]}
    for expected in ("runs/ddp/config.yaml", "runs/ddp/metrics.json", "runs/ddp/thresholds.json",
                     "runs/ddp/checkpoint_epoch-0002/model.pt"):
        assert expected in keys
    summary = json.loads(storage.read_text(f"{out}/ddp/metrics.json"))["summary"]
    assert summary["workers"] == 2

    evaluation = agpctl("eval", "--run", f"{out}/ddp", "--json", timeout=300, env=env)
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    table = json.loads(evaluation.stdout)["metrics"]
    for category, row in outcome["metrics"].items():
        for name, value in row.items():
            if value is not None:
                assert table[category][name] == pytest.approx(value, abs=1e-6), (category, name)

    # The S3 run also serves predict, reading images from and writing results to S3.
    images = f"{data_uri}/fabric/test/good"
    predicted = agpctl("predict", images, "--run", f"{out}/ddp", "--out", f"s3://{s3_bucket}/predictions",
                       "--threshold", "0.5", "--no-images", "--json",  # tiny run: no held-out normals
                       timeout=300, env=env)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert json.loads(predicted.stdout)["summary"]["images"] == len(storage.list_files(images))
    assert storage.exists(f"s3://{s3_bucket}/predictions/predictions.csv")
