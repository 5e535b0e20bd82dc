"""`--ray-address`: joining a real two-node Ray cluster started on this machine with `ray start`.

The cluster is what a user starts by hand: a head node (`ray start --head --port P`) and a second
node joining it (`ray start --address 127.0.0.1:P`), each with one CPU, its own temporary folder and
its own ports, with Ray's token authentication on (a token private to the test). The command joins
it with `--ray-address 127.0.0.1:P` and leaves it running. Every process of the cluster carries a
marker in its environment; the fixture stops exactly those processes (never `ray stop`, which
would stop every Ray instance of the machine).

Oracles: `auto` (with RAY_ADDRESS, as on a node of the cluster) joins the same cluster; the
work-folder check reaches both nodes (two nodes on one host are two probes); the
Step-1 maps and the 2-rank distilled weights equal those of the same command on a private
instance (the executor and where the ranks run change no result).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from medsclean.workdir.artifacts import load_tensors
from medsclean.workdir.store import Store

from .helpers import crops, require_ray, save_png, texture

pytestmark = pytest.mark.ray
MARKER = "MEDSCLEAN_TEST_CLUSTER"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _marked(value: str) -> list[int]:
    """Ids of the processes whose environment holds MARKER=value (every process the cluster started)."""
    needle = f"{MARKER}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _stop(value: str) -> None:
    """SIGTERM the marked processes, then SIGKILL what is left after 15 s."""
    for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        for pid in _marked(value):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while _marked(value) and time.monotonic() < deadline:
            time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster():
    """(address, environment for commands that join it): two nodes of one CPU each."""
    require_ray()
    ray_cli = str(Path(sys.executable).with_name("ray"))
    # Ray's unix sockets live under --temp-dir and must stay under 107 bytes: pytest's numbered
    # temp folders grow with every run, so the nodes get a short folder of their own
    root = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp"))
    value = uuid.uuid4().hex
    env = {**os.environ, MARKER: value, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    port = _free_port()
    address = f"127.0.0.1:{port}"
    common = ["--num-cpus", "1", "--disable-usage-stats", "--dashboard-agent-listen-port"]
    try:
        nodes = {"head": ["--head", "--port", str(port), "--include-dashboard", "false"],
                 "second": ["--address", address]}
        for node, extra in nodes.items():
            started = subprocess.run([ray_cli, "start", *extra, *common, str(_free_port()),
                                      "--temp-dir", str(root / node)],
                                     env=env, capture_output=True, text=True, timeout=180)
            assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        yield address, env
    finally:
        _stop(value)
        shutil.rmtree(root, ignore_errors=True)
    assert _marked(value) == []


def _images(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for name in ("brick", "gravel"):
        for i, image in enumerate(crops(texture(name), 8, 64, rng)):
            save_png(root / name / f"{i:02d}.png", image)
    return root


def test_distill_on_a_two_node_cluster_equals_a_private_instance(cluster, tmp_path):
    address, env = cluster
    images = _images(tmp_path / "images")
    medsclean = [sys.executable, "-m", "medsclean"]
    encoder = [str(images), "--resize", "64", "--crop", "64", "--num-workers", "0"]
    stages = ["distill", *encoder, "--engine", "exact", "--banks", "8", "--distill-iters", "3", "--width", "16",
              "--depth", "2", "--heads", "2", "--json", "--train-workers", "2", "--executor", "ray"]
    runs = {"cluster": ["--ray-address", address], "private": ["--ray-workers", "2"]}
    for name, where in runs.items():
        work = ["--work", str(tmp_path / name)]
        # Features from this process's encoder in both (Ray's one-thread encoder actors may differ in the last bit).
        extracted = subprocess.run([*medsclean, "extract", *encoder, "--quiet", *work], env=env,
                                   capture_output=True, text=True, timeout=300)
        assert extracted.returncode == 0, extracted.stderr
        done = subprocess.run([*medsclean, *stages, *work, *where], env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        if name == "cluster":
            assert f"executor: the Ray cluster at {address}, 2 CPU workers" in done.stderr
            assert "data-parallel on 2 Ray Train workers" in done.stderr
    joined, private = (Store(tmp_path / name) for name in runs)
    assert torch.equal(load_tensors(joined.load("score").file("scores.safetensors"))["maps"],
                       load_tensors(private.load("score").file("scores.safetensors"))["maps"])
    weights = [load_tensors(store.load("distill").file("model.safetensors")) for store in (joined, private)]
    assert weights[0].keys() == weights[1].keys()
    for key, value in weights[0].items():
        assert torch.allclose(value, weights[1][key], atol=1e-6), key


def test_auto_joins_the_cluster_and_the_work_folder_check_reaches_both_nodes(cluster, tmp_path):
    """`--ray-address auto` finds the cluster through RAY_ADDRESS (as on a cluster node). Both nodes
    share a host address: the check must still send one probe to each."""
    address, env = cluster
    script = ("import sys; from pathlib import Path; from medsclean import distributed; "
              "from medsclean.config import ClusterConfig; from medsclean.distributed.session import "
              "check_shared_work_folder as check; s = distributed.connect(ClusterConfig(executor='ray', "
              "address=sys.argv[1]), Path(sys.argv[2])); print(s.workers, check(Path(sys.argv[2]))); "
              "distributed.shutdown()")
    done = subprocess.run([sys.executable, "-c", script, "auto", str(tmp_path / "work")],
                          env={**env, "RAY_ADDRESS": address},
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["2", "2"]  # two CPU workers, two nodes probed
    assert not list((tmp_path / "work").glob(".cluster-probe-*"))
