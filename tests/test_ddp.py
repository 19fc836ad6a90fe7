"""Multi-process training (issue 10, item 6): DDP with gloo, 2 ranks on 127.0.0.1.

Each rank gets half the batch; DDP averages the gradients, which must equal the single-process
gradient of the mean loss over the whole batch (fp64: 1e-12).
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import rampde_plugins  # noqa: F401

from ._ddp_model import ODEBlock, data

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")
JOB = os.path.join(os.path.dirname(__file__), "_ddp_job.py")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process():
    torch.manual_seed(0)
    block = ODEBlock()
    x, target = data()
    (block(x) - target).square().mean().backward()
    return {n: p.grad for n, p in block.named_parameters()}


@pytest.mark.parametrize("mode", ["model", "field"])
def test_ddp_gradients_equal_single_process(mode):
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_XDIST_WORKER"}
    out = subprocess.run([sys.executable, JOB, mode, str(_free_port())], capture_output=True, text=True,
                         timeout=300, env=env, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr[-3000:]
    ddp = json.loads(out.stdout.strip().splitlines()[-1])
    ref = _single_process()
    for name, g in ref.items():
        got = torch.tensor(ddp[name], dtype=g.dtype)
        assert (got - g).norm() <= 1e-12 * g.norm(), name
