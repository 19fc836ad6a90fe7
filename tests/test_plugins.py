"""The pluggy layer: hookimpls, entry points, duplicates, autoload switch, default-policy hook."""

import importlib.metadata
import re
import subprocess
import sys
import types

import pytest
import torch
from torchdiffeq import odeint

import rampde_plugins
from rampde_plugins import ButcherTableau, PrecisionPolicy, collect_stats, hookimpl
from rampde_plugins import _manager

from .helpers import FakeDist, FakeEntryPoint

CUSTOM = PrecisionPolicy("bf16_store16", torch.bfloat16, torch.float32, storage_dtype=torch.float16,
                         description="test: bf16 velocities, fp16 storage")


class PolicyPlugin:
    @hookimpl
    def rampde_register_precision_policies(self, registry):
        registry.add_policy(CUSTOM)


RALSTON = ButcherTableau("ralston", c=[0, 2 / 3], a=[[], [2 / 3]], b=[1 / 4, 3 / 4], order=2)


class TableauPlugin:
    @hookimpl
    def rampde_register_tableaus(self, registry):
        registry.add_tableau(RALSTON)


def _solve(precision=None, method="rampde_rk4"):
    opts = {"step_size": 0.25}
    if precision is not None:
        opts["precision"] = precision
    with collect_stats() as stats:
        y0 = torch.ones(3, requires_grad=True)
        y = odeint(lambda t, y: -y, y0, torch.tensor([0.0, 1.0]), method=method, options=opts)
    return y, stats.last


def test_policy_from_a_hookimpl_is_usable_by_name():
    plugin = PolicyPlugin()
    rampde_plugins.register_plugin(plugin, name="test-policies")
    try:
        assert rampde_plugins.get_registry().provider("policy", "bf16_store16") == "test-policies"
        y, stats = _solve("bf16_store16")
        assert stats.policy == "bf16_store16" and stats.stored_bytes == 4 * 3 * 2  # fp16 storage
        assert abs(y[-1, 0].item() - torch.exp(torch.tensor(-1.0)).item()) < 1e-2
    finally:
        rampde_plugins.unregister_plugin(plugin)
    with pytest.raises(ValueError, match="unknown precision policy 'bf16_store16'; registered policies: bf16, fp16"):
        _solve("bf16_store16")


def test_policy_from_an_entry_point_of_a_fake_distribution(monkeypatch):
    module = types.ModuleType("fake_rampde_policies")
    module.rampde_register_precision_policies = PolicyPlugin.rampde_register_precision_policies.__get__(PolicyPlugin())
    dist = FakeDist("fake-policies", "9.9", [FakeEntryPoint("fake_policies", module)])
    real = importlib.metadata.distributions
    monkeypatch.setattr(importlib.metadata, "distributions", lambda **kw: [*real(**kw), dist])
    monkeypatch.setattr(_manager, "_state", _manager._State())  # a fresh, process-wide manager
    pm = rampde_plugins.get_plugin_manager()
    assert pm.get_plugin("fake_policies") is module
    assert any(d.project_name == "fake-policies" and d.version == "9.9" for _, d in pm.list_plugin_distinfo())
    assert rampde_plugins.get_registry().provider("policy", "bf16_store16") == "fake_policies"
    _, stats = _solve("bf16_store16")
    assert stats.policy == "bf16_store16"


def test_autoload_can_be_disabled(monkeypatch):
    monkeypatch.setenv(rampde_plugins.DISABLE_AUTOLOAD_ENV, "1")
    pm = rampde_plugins.make_plugin_manager()
    assert [n for n, _ in pm.list_name_plugin()] == [_manager.BUILTIN_PLUGIN_NAME]
    monkeypatch.delenv(rampde_plugins.DISABLE_AUTOLOAD_ENV)
    assert "torchdiffeq" in dict(rampde_plugins.make_plugin_manager().list_name_plugin())


def test_duplicate_names_name_both_plugins_and_change_nothing():
    class Clash:
        @hookimpl
        def rampde_register_precision_policies(self, registry):
            registry.add_policy(PrecisionPolicy("fp16", None, torch.float32))

    before = dict(rampde_plugins.get_registry().policies)
    with pytest.raises(ValueError, match=r"precision policy 'fp16' is registered twice: by plugin 'clash' and by plugin 'rampde_plugins.builtin'"):
        rampde_plugins.register_plugin(Clash(), name="clash")
    assert dict(rampde_plugins.get_registry().policies) == before
    assert rampde_plugins.get_plugin_manager().get_plugin("clash") is None


def test_default_policy_hook_is_firstresult_and_overrides_builtin():
    class PreferFp32:
        @hookimpl
        def rampde_default_policy(self, device_type, autocast_dtype, state_dtype):
            return "fp32" if autocast_dtype == torch.bfloat16 else None

    plugin = PreferFp32()
    rampde_plugins.register_plugin(plugin)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, stats = _solve()
        assert stats.policy == "fp32"
        with torch.autocast("cpu", dtype=torch.float16):  # the plugin returns None -> built-in decides
            _, stats = _solve()
        assert stats.policy == "fp16"
    finally:
        rampde_plugins.unregister_plugin(plugin)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, stats = _solve()
    assert stats.policy == "bf16"


def test_default_policy_follows_state_dtype_without_autocast():
    assert _solve()[1].policy == "fp32"
    with collect_stats() as stats:
        odeint(lambda t, y: -y, torch.ones(2, dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64), method="rampde_euler")
    assert stats.last.policy == "fp64"


def test_registered_tableau_appears_in_torchdiffeq_and_leaves_with_the_plugin():
    solvers = importlib.import_module("torchdiffeq._impl.odeint").SOLVERS
    plugin = TableauPlugin()
    rampde_plugins.register_plugin(plugin, name="ralston-plugin")
    try:
        assert "rampde_ralston" in solvers
        y, _ = _solve("fp64", method="rampde_ralston")
        # Ralston's method on y' = -y: growth factor 1 - h + h^2/2 per step (h = 0.25, 4 steps).
        assert abs(y[-1, 0].item() - (1 - 0.25 + 0.25**2 / 2) ** 4) < 1e-12
    finally:
        rampde_plugins.unregister_plugin(plugin)
    assert "rampde_ralston" not in solvers


def test_invalid_registrations_are_type_checked():
    class Bad:
        @hookimpl
        def rampde_register_tableaus(self, registry):
            registry.add_tableau("rk4")

    with pytest.raises(TypeError, match=r"add_tableau expects a ButcherTableau, got str from plugin 'bad'"):
        rampde_plugins.register_plugin(Bad(), name="bad")


def test_cli_lists_plugins_methods_and_policies():
    out = subprocess.run([sys.executable, "-m", "rampde_plugins"], capture_output=True, text=True, check=True).stdout
    assert "rampde-plugins 0.1.0" in out and "rampde_torchdiffeq" in out  # plugin with its distribution
    assert "torchdiffeq" in out and "installed" in out
    assert "rampde_rk4" in out and "Kutta's 3/8 rule" in out
    for name in ("fp64", "fp32", "bf16", "fp16", "fp16_gradscaler"):
        assert f"\n  {'*' if name == 'fp32' else ' '} {name} " in out  # * marks the default policy
    assert re.search(r"rampde_euler +order 1  1 stage    explicit  fixed steps", out)
    assert re.search(r"rampde_dopri5 +order 5  7 stages   explicit  adaptive", out)
    assert re.search(r"rampde_trbdf2 +order 2  3 stages   implicit  adaptive", out)
    assert re.search(r"rampde_sdirk2 +order 2  2 stages   implicit  fixed steps", out)


def test_shared_method_with_other_error_weights_is_not_merged():
    """Two registrations of 'dopri5' that agree in c, A, b but not in b_err would take different
    adaptive steps under one name: the duplicate-name error names both plugins (issue 9, item 10)."""
    dopri5 = rampde_plugins.get_registry().tableau("dopri5")
    other_err = [w * 2.0 for w in dopri5.b_err]

    class OtherErrorWeights:
        @hookimpl
        def rampde_register_tableaus(self, registry):
            registry.add_tableau(ButcherTableau("dopri5", c=dopri5.c, a=dopri5.a, b=dopri5.b, order=dopri5.order,
                                                b_err=other_err), shared=True)

    before = dict(rampde_plugins.get_registry().tableaus)
    with pytest.raises(ValueError, match=r"method 'dopri5' is registered by plugin '.*' and by plugin '.*' "
                                         r"with different coefficients \(c, A, b, error weights b_err or order differ\)"):
        rampde_plugins.register_plugin(OtherErrorWeights(), name="other-err")
    assert "other-err" not in [n for n, _ in rampde_plugins.get_plugin_manager().list_name_plugin()]
    assert dict(rampde_plugins.get_registry().tableaus) == before
