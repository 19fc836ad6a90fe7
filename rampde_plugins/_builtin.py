"""The built-in plugin: rampde's own policies, tableaus and default-policy rule.

Registered like any other plugin, with ``trylast`` so a user plugin's answer comes first.
"""

import torch

from ._hookspecs import hookimpl
from ._policy import BUILTIN_POLICIES
from ._tableau import BUILTIN_TABLEAUS


@hookimpl(trylast=True)
def rampde_register_precision_policies(registry):
    for policy in BUILTIN_POLICIES:
        registry.add_policy(policy)


@hookimpl(trylast=True)
def rampde_register_tableaus(registry):
    for tableau in BUILTIN_TABLEAUS:
        registry.add_tableau(tableau)


_BY_AUTOCAST = {torch.float16: "fp16", torch.bfloat16: "bf16"}
_BY_STATE = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@hookimpl(trylast=True)
def rampde_default_policy(device_type, autocast_dtype, state_dtype):
    if autocast_dtype is not None:
        return _BY_AUTOCAST.get(autocast_dtype)
    # A half-precision y0 without autocast means "low precision": give it the mixed policy (fp32
    # state) rather than an fp16 recurrence, which would round small increments away.
    return _BY_STATE.get(state_dtype)
