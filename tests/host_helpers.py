"""Helpers that look into torchdiffeq itself (its solver table, its callback API)."""

import importlib.metadata

import pytest
from torchdiffeq._impl import misc as _torchdiffeq_misc
from torchdiffeq._impl.odeint import SOLVERS as _TORCHDIFFEQ_SOLVERS

#: rampde methods that torchdiffeq also has under the same name (compared 1:1 with the host).
HOST_METHODS = ["euler", "midpoint", "heun2", "heun3", "rk4"]
_TORCHDIFFEQ = importlib.metadata.version("torchdiffeq")


def host_method_params():
    """HOST_METHODS for parametrize; a method this torchdiffeq lacks (heun3 < 0.2.4, heun2 < 0.2.5) skips."""
    return [
        pytest.param(m, marks=pytest.mark.skipif(
            m not in _TORCHDIFFEQ_SOLVERS, reason=f"torchdiffeq {_TORCHDIFFEQ} has no method {m!r} to compare with"))
        for m in HOST_METHODS
    ]


#: torchdiffeq's callback API (callback_step, callback_accept_step, ...; 0.2.4+).
needs_torchdiffeq_callbacks = pytest.mark.skipif(
    not hasattr(_torchdiffeq_misc, "_all_callback_names"),
    reason=f"torchdiffeq {_TORCHDIFFEQ} has no callback API (callback_step etc., torchdiffeq >= 0.2.4)",
)
