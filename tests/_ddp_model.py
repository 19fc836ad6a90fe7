"""The model shared by tests/test_ddp.py and its rank processes (tests/_ddp_job.py)."""

import torch
from torch import nn
from torchdiffeq import odeint

F64 = torch.float64


class Field(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 16, dtype=F64), nn.Tanh(), nn.Linear(16, 3, dtype=F64))

    def forward(self, t, y):
        return self.net(y)


class ODEBlock(nn.Module):
    """y(1) of dy/dt = field(y) from y(0) = x, with rampde_rk4 (discrete adjoint, fp64)."""

    def __init__(self):
        super().__init__()
        self.field = Field()

    def forward(self, x):
        t = torch.tensor([0.0, 1.0], dtype=F64)
        return odeint(self.field, x, t, method="rampde_rk4", options={"step_size": 0.125, "precision": "fp64"})[-1]


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, dtype=F64, generator=g), torch.randn(8, 3, dtype=F64, generator=g)
