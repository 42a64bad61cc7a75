"""The cluster path: stages join the Ray cluster that params.yaml's ``ray.address`` (or the
RAY_ADDRESS environment variable) names, instead of starting a local Ray. A real one-node
cluster started with ``ray start --head`` stands in for the cluster; as on a real one,
the head and its clients share a token (``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN``)."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import json, sys
sys.path.insert(0, {stages!r})
from common import start_ray
import ray
start_ray()
print(json.dumps({{"gcs": ray.get_runtime_context().gcs_address, "cpus": ray.cluster_resources().get("CPU")}}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head():
    """A one-node Ray cluster with 1 CPU (the local Ray a stage would start has ``num_cpus``)."""
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    os.environ.update(auth)  # for the head, `ray status` here and the probes' clients (removed below)
    port, temp = free_port(), tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths have a limit
    ray_bin = str(Path(sys.executable).parent / "ray")
    proc = subprocess.Popen([ray_bin, "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
                             f"--temp-dir={temp}", "--disable-usage-stats", "--block"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if subprocess.run([ray_bin, "status", f"--address=127.0.0.1:{port}"], capture_output=True).returncode == 0:
                break
            if proc.poll() is not None:
                pytest.fail(f"ray start --head exited: {proc.stdout.read()}")
            time.sleep(1)
        else:
            pytest.fail("the Ray head did not come up within 120 s")
        yield port
    finally:
        proc.terminate()  # --block: ray start stops the node's processes when it is signalled
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(temp, ignore_errors=True)
        for key in auth:
            os.environ.pop(key)


def probe(tmp_path: Path, address: str, env_address: str | None = None) -> dict:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"ray": {"address": address, "num_cpus": 2}}))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if env_address:
        env["RAY_ADDRESS"] = env_address
    proc = subprocess.run([sys.executable, "-c", PROBE.format(stages=str(ROOT / "stages"))], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_address_in_params_reaches_ray_init(head, tmp_path):
    joined = probe(tmp_path, f"127.0.0.1:{head}")
    assert joined["gcs"].endswith(f":{head}")  # the head's GCS (reported at the node's own IP)
    assert joined["cpus"] == 1.0  # the cluster's CPUs, not those of a new local Ray (num_cpus 2)


def test_ray_address_in_the_environment_wins(head, tmp_path):
    joined = probe(tmp_path, "", env_address=f"127.0.0.1:{head}")
    assert joined["gcs"].endswith(f":{head}") and joined["cpus"] == 1.0
