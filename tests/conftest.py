import os

import pytest
import torch

# Two xdist workers on two cores: one intra-op thread each avoids oversubscription.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test starts from the same global RNG state, whatever ran before it on its worker."""
    torch.manual_seed(0)


def pytest_report_header(config):
    import importlib.metadata as md

    import rampde_plugins

    def v(dist):
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return "not installed"

    plugins = ", ".join(sorted(n for n, p in rampde_plugins.get_plugin_manager().list_name_plugin() if p is not None))
    return [
        f"torch {torch.__version__}, torchdiffeq {v('torchdiffeq')}, torchode {v('torchode')}",
        f"rampde_plugins {rampde_plugins.__version__}; plugins: {plugins}",
    ]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
