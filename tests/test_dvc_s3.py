"""The multi-node recipe's data path: activation shards pushed to an S3 DVC remote and pulled back, byte for byte.

The S3 server is moto's (``moto_server``, from the dev extras) on 127.0.0.1; credentials are fake and set only
in the environment of the commands this test runs. Skipped where dvc-s3 or moto is not installed.
"""

from __future__ import annotations

import importlib.util
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e import env

from pipeline.activations import open_activations
from pipeline.synthetic import write_synthetic_activations

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("dvc_s3") is None or importlib.util.find_spec("moto") is None,
                       reason="needs the dev extras' dvc-s3 and moto[s3]"),
]
FAKE_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def s3_endpoint() -> Iterator[str]:
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "moto_server did not start"
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=10)


def files(root: Path) -> dict[Path, bytes]:
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def dvc(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    res = subprocess.run(["dvc", *args], cwd=cwd, env={**env(), **FAKE_AWS}, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, f"dvc {' '.join(args)}: {res.stdout[-2000:]}\n{res.stderr[-2000:]}"
    return res


def test_activations_round_trip_through_an_s3_remote(tmp_path: Path, s3_endpoint: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket="sae-runs")
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=repo, env=env(), check=True)
    dvc("init", "-q", cwd=repo)
    # The README's commands: a default S3 remote with the server's endpoint.
    dvc("remote", "add", "-d", "store", "s3://sae-runs/dvc", cwd=repo)
    dvc("remote", "modify", "store", "endpointurl", s3_endpoint, cwd=repo)
    acts = repo / "data/activations/train/layers.1.resid_post"
    write_synthetic_activations(acts, n_tokens=3000, d_model=16, n_features=24, k_true=2, seed=0, shard_rows=1000)
    dvc("add", "data/activations", cwd=repo)
    before = files(repo / "data/activations")
    dvc("push", cwd=repo)

    # Another node: the same commit, an empty cache, nothing in data/.
    shutil.rmtree(repo / ".dvc/cache")
    shutil.rmtree(repo / "data/activations")
    dvc("pull", cwd=repo)
    after = files(repo / "data/activations")
    assert after == before and len(before) == 7  # 3 shards + 3 sidecars + the manifest
    open_activations(acts, verify=True)  # every shard's sha256 matches its manifest
