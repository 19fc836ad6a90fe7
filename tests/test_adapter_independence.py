"""Adapters are independent of each other, found from the entry-point group, and honest about what refuses.

* ``rampde_plugins.solve``, the host-neutral entry the torchsde adapter solves through: references are
  torchdiffeq's own methods in fp64 (autograd through their steps) and closed forms;
* the torchsde adapter gives the values and gradients of the torchdiffeq front end it used before
  (``torchdiffeq.odeint``/``odeint_adjoint`` with a rampde method, recreated here as the reference) with
  the torchdiffeq adapter uninstalled, with torchdiffeq not importable, and with autoload off and only
  ``install("torchsde")``;
* with autoload off, ``install(name)`` loads any entry point of the group by name (a third party's
  too) and names a broken one;
* torchode's ``RampdeAdjoint`` and ``QuadratureAdjoint`` evaluate ``term.vf`` when a term overrides it,
  as torchode's own solvers do (reference: torchode's ``AutoDiffAdjoint``);
* ``create_graph=True`` through a quadrature adjoint names the quadrature adjoint and the way out.
"""

from __future__ import annotations

import ast
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

torchsde = pytest.importorskip("torchsde")

import torchode as to  # noqa: E402

import rampde_plugins  # noqa: E402
from rampde_plugins import KarhunenLoeveNoise, WongZakaiField  # noqa: E402
from rampde_torchode import QuadratureAdjoint, RampdeAdjoint  # noqa: E402
from rampde_torchsde import sdeint  # noqa: E402

F64 = torch.float64
ROOT = Path(__file__).resolve().parents[1]


# -- rampde_plugins.solve ---------------------------------------------------------------------------------

class Field(torch.nn.Module):
    def __init__(self, d=3, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(d, d, generator=g, dtype=F64) / d)
        self.b = torch.nn.Parameter(torch.randn(d, generator=g, dtype=F64) / d)

    def forward(self, t, y):
        return torch.tanh(y @ self.w.T + self.b) * torch.cos(t) - 0.3 * y


def _value_and_grads(run, field, y0):
    y0 = y0.clone().requires_grad_(True)
    ys = run(field, y0)
    loss = (ys ** 2).sum() + ys[-1, :, 0].sum()
    grads = torch.autograd.grad(loss, (y0, *field.parameters()))
    return ys.detach(), grads


def test_solve_fixed_steps_equal_torchdiffeqs_own_rk4_in_value_and_gradient():
    from torchdiffeq import odeint  # (imported where used: the subprocesses below import this module without it)

    # rampde's rk4 is torchdiffeq's (Kutta's 3/8 rule); its discrete adjoint is the exact gradient of the
    # steps, which autograd through torchdiffeq's own steps also is.
    field, y0 = Field(), torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.0, 0.35, 1.2], dtype=F64)
    ours, g_ours = _value_and_grads(lambda f, y: rampde_plugins.solve(f, y, t, method="rk4", step_size=0.05), field, y0)
    ref, g_ref = _value_and_grads(lambda f, y: odeint(f, y, t, method="rk4", options={"step_size": 0.05}), field, y0)
    torch.testing.assert_close(ours, ref, rtol=1e-13, atol=1e-14)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)


def test_solve_adaptive_steps_equal_torchdiffeqs_own_dopri5():
    from torchdiffeq import odeint

    # In fp64 the accepted step sequence is torchdiffeq's, and the outputs are read off the same quartic.
    field, y0 = Field(), torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0.0, 0.4, 0.9, 2.0], dtype=F64)
    with rampde_plugins.collect_stats() as stats:
        ours = rampde_plugins.solve(field, y0, t, method="dopri5", rtol=1e-6, atol=1e-8)
    ref = odeint(field, y0, t, method="dopri5", rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-13)
    assert stats.last.n_steps > 5 and stats.last.method == "rampde_dopri5"


@pytest.mark.parametrize("method, kw", [("rk4", {"step_size": 0.01}), ("dopri5", {"rtol": 1e-10, "atol": 1e-12}),
                                        ("kvaerno3", {"rtol": 1e-8, "atol": 1e-10})])
@pytest.mark.parametrize("adjoint", ["discrete", "quadrature"])
def test_solve_gradients_equal_the_closed_form(method, kw, adjoint):
    # y' = a y: y(t) = y0 e^{a t}; L = sum_i y(t_i)^2, dL/da = sum_i 2 t_i y(t_i)^2, dL/dy0 = sum_i 2 y(t_i) e^{a t_i}.
    a = torch.tensor(-0.7, dtype=F64, requires_grad=True)
    y0 = torch.tensor([1.3, -0.4], dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.5], dtype=F64)
    ys = rampde_plugins.solve(lambda s, y: a * y, y0, t, method=method, params=(a,), adjoint=adjoint, **kw)
    g_a, g_y0 = torch.autograd.grad((ys ** 2).sum(), (a, y0))
    with torch.no_grad():
        exact = y0 * torch.exp(a * t)[:, None]
        tol = 1e-6 if method == "kvaerno3" else 1e-8
        torch.testing.assert_close(ys, exact, rtol=tol, atol=tol)
        torch.testing.assert_close(g_a, (2 * t[:, None] * exact ** 2).sum(), rtol=tol, atol=tol)
        torch.testing.assert_close(g_y0, (2 * exact * torch.exp(a * t)[:, None]).sum(0), rtol=tol, atol=tol)


class _Counting(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0
        self.k = torch.nn.Parameter(torch.tensor(0.5, dtype=F64))

    def forward(self, t, y):
        self.calls += 1
        return -self.k * y


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(method="rampde_rk4"), ValueError,
     r"method='rampde_rk4' is not a registered method \(the registry name of 'rampde_rk4' is 'rk4'\); registered "
     r"methods: .*rk4"),
    (dict(method=4), ValueError, r"method=4 is not a registered method; registered methods: .*euler"),
    (dict(adjoint="backsolve"), ValueError, r"adjoint='backsolve'; choose one of discrete, quadrature"),
    (dict(step_size=-0.1), ValueError, r"step_size=-0.1 must be a positive finite number"),
    (dict(step_size=0.1, grid=torch.linspace(0, 1, 5, dtype=F64)), ValueError, r"step_size=0.1 and grid= both"),
    (dict(grid=torch.linspace(0, 0.5, 5, dtype=F64)), ValueError, r"grid must start at t\[0\]=0.0 and end at t\[-1\]=1.0"),
    (dict(precision="fp12"), ValueError, r"unknown precision policy 'fp12'; registered policies: .*fp64"),
    (dict(precision=3), TypeError, r"precision must be a policy name or a PrecisionPolicy, got int"),
    (dict(method="dopri5", rtol=-1e-3), ValueError, r"rtol=-0.001 must be a non-negative finite number"),
    (dict(method="dopri5", interp="cubic"), ValueError, r"interp apply to fixed steps; 'dopri5' adapts"),
    (dict(first_step=0.1), ValueError, r"first_step apply to adaptive steps; 'rk4' takes fixed steps"),
    (dict(interp="quintic"), ValueError, r"interp='quintic'; choose one of linear, cubic"),
    (dict(checkpoint="everything"), ValueError, r"checkpoint.*'everything'"),
    (dict(checkpoint=2, memory_budget="1MB"), ValueError, r"both choose the checkpoint schedule"),
    (dict(adjoint="quadrature", checkpoint=2), ValueError, r"checkpoint apply to adjoint='discrete'"),
    (dict(adjoint="quadrature", quadrature={"nodes": 3}), ValueError,
     r"unknown quadrature option\(s\) \['nodes'\]; valid: quadrature_nodes"),
    (dict(quadrature={"quadrature_nodes": 3}), ValueError, r"quadrature apply to adjoint='quadrature'"),
    (dict(method="dopri5", adjoint="quadrature", adjoint_method="rk4"), ValueError,
     r"adjoint_method='rk4' has no error estimate"),
    (dict(adjoint="quadrature", adjoint_method="rk5"), ValueError, r"adjoint_method='rk5' is not a registered method"),
    (dict(newton={"rtol": 1e-3}), ValueError, r"newton apply to implicit methods; 'rk4' is explicit"),
    (dict(params=[1.0]), TypeError, r"params must contain only tensors, got a float"),
    (dict(scaler="dynamic"), TypeError, r"scaler must be a rampde_plugins.AdjointScaler, got str"),
    (dict(t=torch.tensor([0.0, 1.0, 0.5], dtype=F64)), ValueError, r"t must be strictly increasing; t\[1\]=1.0"),
    (dict(t=torch.tensor([0, 1])), ValueError, r"t has dtype torch.int64; use float32 or float64"),
    (dict(y0=torch.tensor([1.0, math.nan], dtype=F64)), ValueError, r"y0 contains NaN or inf \(first at flat index 1\)"),
])
def test_solve_validates_every_argument_before_evaluating_anything(kwargs, error, match):
    f = _Counting()
    args = dict(method="rk4", y0=torch.tensor([1.0, 2.0], dtype=F64), t=torch.tensor([0.0, 1.0], dtype=F64))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        rampde_plugins.solve(f, args.pop("y0"), args.pop("t"), **args)
    assert f.calls == 0 and f.k.grad is None


# -- torchsde without torchdiffeq -------------------------------------------------------------------------

class NeuralSDE(torch.nn.Module):
    noise_type, sde_type = "general", "ito"

    def __init__(self, d=2, m=3):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.a = torch.nn.Parameter(torch.randn(d, d + 1, generator=g, dtype=F64) / 2)
        self.s = torch.nn.Parameter(torch.randn(d * m, d, generator=g, dtype=F64) / 2)
        self.d, self.m = d, m

    def f(self, t, y):
        return torch.tanh(torch.cat([y, t.expand(y.shape[0], 1).to(y.dtype)], dim=1) @ self.a.T)

    def g(self, t, y):
        return torch.sigmoid(y @ self.s.T).reshape(y.shape[0], self.d, self.m)


#: (method, adjoint, sdeint keywords): fixed and adaptive steps, both adjoints.
CASES = {
    "rk4-discrete": ("rampde_rk4", "discrete", {}),
    "rk4-quadrature": ("rampde_rk4", "quadrature", {}),
    "dopri5-discrete": ("rampde_dopri5", "discrete", {"rtol": 1e-6, "atol": 1e-7}),
    "dopri5-quadrature": ("rampde_dopri5", "quadrature", {"rtol": 1e-6, "atol": 1e-7}),
    "rk4-dt-binomial": ("rampde_rk4", "discrete", {"dt": 0.05, "options": {"checkpoint": 2}}),
}


def _problem():
    y0 = torch.tensor([[0.3, -0.2], [1.0, 0.5], [-0.7, 0.1]], dtype=F64)
    ts = torch.tensor([0.0, 0.4, 1.0], dtype=F64)
    return NeuralSDE(), y0, ts


def _sdeint_case(case):
    """The solve of ``case`` through rampde_torchsde.sdeint: values and gradients (y0, parameters)."""
    method, adjoint, kw = CASES[case]
    sde, y0, ts = _problem()
    y0 = y0.clone().requires_grad_(True)
    ys = sdeint(sde, y0, ts, method=method, adjoint=adjoint, n_terms=6, generator=3, **kw)
    grads = torch.autograd.grad((ys ** 2).sum() + ys[-1].sum(), (y0, *sde.parameters()))
    return [ys.detach(), *grads]


def _subdivided(max_step):
    # the grid sdeint built for torchdiffeq before (each output interval in equal steps <= max_step)
    def construct(func, y0, t):
        pieces = [t[:1]]
        for i in range(t.shape[0] - 1):
            n = max(1, math.ceil(float(t[i + 1] - t[i]) / max_step - 1e-9))
            piece = t[i] + (t[i + 1] - t[i]) * (torch.arange(1, n + 1, dtype=t.dtype) / n)
            piece[-1] = t[i + 1]
            pieces.append(piece)
        return torch.cat(pieces)

    return construct


def _torchdiffeq_reference(case):
    """What sdeint computed before: the Wong--Zakai ODE through torchdiffeq's front end with a rampde method."""
    from torchdiffeq import odeint, odeint_adjoint

    method, adjoint, kw = CASES[case]
    kw = dict(kw)
    sde, y0, ts = _problem()
    y0 = y0.clone().requires_grad_(True)
    noise = KarhunenLoeveNoise(0.0, 1.0, 6, (3, 3), generator=3)
    field = WongZakaiField(sde, noise)
    options = dict(kw.pop("options", {}))
    dt = kw.pop("dt", None)
    if method == "rampde_rk4":
        step = dt if dt is not None else noise.length / (8 * (noise.n_terms - 0.5))
        options["grid_constructor"] = _subdivided(step)
    solve = odeint_adjoint if adjoint == "quadrature" else odeint
    ys = solve(field, y0, ts, method=method, options=options, rtol=kw.get("rtol", 1e-5), atol=kw.get("atol", 1e-4))
    grads = torch.autograd.grad((ys ** 2).sum() + ys[-1].sum(), (y0, *sde.parameters()))
    return [ys.detach(), *grads]


def _assert_same(got, ref):
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_sdeint_equals_the_torchdiffeq_front_end_with_the_torchdiffeq_adapter_uninstalled(case):
    ref = _torchdiffeq_reference(case)
    _assert_same(_sdeint_case(case), ref)  # the torchdiffeq adapter installed
    rampde_plugins.uninstall("torchdiffeq")
    try:
        _assert_same(_sdeint_case(case), ref)
        sde, y0, ts = _problem()
        via_torchsde = torchsde.sdeint(sde, y0, ts, method="rampde_rk4", n_terms=6, generator=3)
        torch.testing.assert_close(via_torchsde, sdeint(sde, y0, ts, n_terms=6, generator=3), rtol=0, atol=0)
    finally:
        rampde_plugins.install("torchdiffeq")


BLOCK_TORCHDIFFEQ = textwrap.dedent(
    """
    import importlib.abc, sys

    class _NoTorchdiffeq(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torchdiffeq" or name.startswith("torchdiffeq."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
            return None

    sys.meta_path.insert(0, _NoTorchdiffeq())
    """
)


def _run(code: str, env_extra: dict | None = None, pythonpath: str | None = None) -> str:
    env = dict(os.environ)
    env.pop("RAMPDE_PLUGINS_DISABLE_AUTOLOAD", None)
    env.pop("PYTEST_XDIST_WORKER", None)
    env.update(env_extra or {})
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, str(ROOT / "tests"), env.get("PYTHONPATH", "")) if p)
    else:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "tests"), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, "-W", "error", "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.parametrize("autoload", [True, False])
def test_sdeint_without_torchdiffeq_importable(tmp_path, autoload):
    # torchdiffeq cannot be imported at all; with autoload off only the torchsde and torchode adapters are
    # installed (dopri5 is torchode's then), so the torchdiffeq adapter is never even imported.
    out = tmp_path / "out.pt"
    code = BLOCK_TORCHDIFFEQ + textwrap.dedent(
        f"""
        import torch, rampde_plugins
        installed = rampde_plugins.install("torchsde", "torchode") if {not autoload} else None
        import test_adapter_independence as t
        results = {{case: t._sdeint_case(case) for case in t.CASES}}
        sde, y0, ts = t._problem()
        import torchsde
        results["torchsde.sdeint"] = [torchsde.sdeint(sde, y0, ts, method="rampde_rk4", n_terms=6, generator=3)]
        assert "torchdiffeq" not in sys.modules
        if {not autoload}:
            assert installed == ["torchsde", "torchode"], installed
            assert "rampde_torchdiffeq" not in sys.modules
        torch.save(results, {str(out)!r})
        """
    )
    _run(code, {"RAMPDE_PLUGINS_DISABLE_AUTOLOAD": "0" if autoload else "1"})
    results = torch.load(out)
    for case in CASES:
        _assert_same(results[case], _torchdiffeq_reference(case))
    sde, y0, ts = _problem()
    torch.testing.assert_close(results["torchsde.sdeint"][0], sdeint(sde, y0, ts, n_terms=6, generator=3), rtol=0, atol=0)


# Each adapter imports rampde_plugins' public names, its own package and its own host library -- never
# another adapter, another host or a private module of the core; the core imports no host at all.
ADAPTER_HOSTS = {"rampde_torchdiffeq": "torchdiffeq", "rampde_torchode": "torchode", "rampde_torchsde": "torchsde"}
HOSTS = set(ADAPTER_HOSTS.values())


def _imports(path: Path) -> list[tuple[int, str]]:
    """Absolute module names a file imports (statements, and importlib.import_module("...") calls)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            if node.module == "rampde_plugins":  # `from rampde_plugins import _manager` is private too
                found += [(node.lineno, f"rampde_plugins.{a.name}") for a in node.names if a.name.startswith("_")]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append((node.lineno, node.args[0].value))
    return found


def test_adapters_import_only_the_public_core_and_their_own_host():
    wrong = []
    for package, host in ADAPTER_HOSTS.items():
        for path in sorted((ROOT / "adapters" / package).glob("*.py")):
            for line, name in _imports(path):
                top = name.split(".")[0]
                other_adapter = top.startswith("rampde_") and top not in ("rampde_plugins", package)
                private_core = top == "rampde_plugins" and any(p.startswith("_") for p in name.split(".")[1:])
                if other_adapter or private_core or (top in HOSTS and top != host):
                    wrong.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    for path in sorted((ROOT / "rampde_plugins").rglob("*.py")):
        for line, name in _imports(path):
            if name.split(".")[0] in HOSTS or name.split(".")[0] in ADAPTER_HOSTS:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not wrong, "\n".join(wrong)


# -- entry points, found as any third party's are -------------------------------------------------------

THIRD_PARTY = {
    "fakeplug-0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: fakeplug\nVersion: 0.1\n",
    "fakeplug-0.1.dist-info/entry_points.txt":
        "[rampde_plugins]\nfakehost = fake_rampde_adapter\nbrokenplug = fake_rampde_missing_module\n",
    "fake_rampde_adapter.py": textwrap.dedent(
        """
        from rampde_plugins import HostAdapter, hookimpl

        class JsonAdapter(HostAdapter):
            name, host_module = "fakehost", "json"

            def __init__(self):
                super().__init__()
                self.table = {}

            def _method_table(self):
                return self.table

            def _add_method(self, table, key, tableau):
                self._add_entry(table, key, tableau)

            def install(self, registry):
                for name, tableau in registry.tableaus.items():
                    self._add_method(self.table, self.prefix + name, tableau)
                self.installed = True

        @hookimpl
        def rampde_register_adapters(registry):
            registry.add_adapter(JsonAdapter())
        """
    ),
}


def test_with_autoload_off_install_finds_any_adapter_in_the_entry_point_group(tmp_path):
    for rel, text in THIRD_PARTY.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    code = textwrap.dedent(
        """
        import json, sys, torch, torchsde
        import rampde_plugins
        pm = rampde_plugins.get_plugin_manager()
        out = {"before": sorted(n for n, _ in pm.list_name_plugin())}
        out["torchsde"] = rampde_plugins.install("torchsde")
        out["after_torchsde"] = sorted(n for n, _ in pm.list_name_plugin())
        import test_adapter_independence as t
        sde, y0, ts = t._problem()
        ys = torchsde.sdeint(sde, y0, ts, method="rampde_rk4", n_terms=6, generator=3)
        out["ys"] = ys[-1].tolist()
        out["fakehost"] = rampde_plugins.install("fakehost")
        out["fake_methods"] = "rampde_rk4" in rampde_plugins.get_registry().adapters["fakehost"].table
        try:
            rampde_plugins.install("brokenplug")
        except rampde_plugins._manager.RampdePluginError as exc:
            out["broken"], out["broken_plugin"] = str(exc), exc.plugin
        try:
            rampde_plugins.install("nosuchplug")
        except ValueError as exc:
            out["unknown"] = str(exc)
        out["all"] = sorted(rampde_plugins.install())  # no names: this project's own adapters (and those loaded)
        out["plugins"] = sorted(n for n, _ in pm.list_name_plugin())
        from rampde_plugins._manager import own_plugins
        out["own"] = sorted(own_plugins())
        rampde_plugins.uninstall("torchsde")
        out["restored"] = not hasattr(torchsde.sdeint, "_rampde_original")
        print(json.dumps(out))
        """
    )
    out = json.loads(_run(code, {"RAMPDE_PLUGINS_DISABLE_AUTOLOAD": "1"}, pythonpath=str(tmp_path)).splitlines()[-1])
    assert out["before"] == ["rampde_plugins.builtin"]
    assert out["torchsde"] == ["torchsde"] and out["after_torchsde"] == ["rampde_plugins.builtin", "torchsde"]
    sde, y0, ts = _problem()
    assert out["ys"] == sdeint(sde, y0, ts, n_terms=6, generator=3)[-1].tolist()
    assert out["fakehost"] == ["fakehost"] and out["fake_methods"]
    assert out["broken_plugin"] == "brokenplug"
    assert "plugin 'brokenplug' (entry point 'brokenplug' of fakeplug 0.1) is broken: ModuleNotFoundError" in out["broken"]
    assert "unknown adapter 'nosuchplug'" in out["unknown"] and "brokenplug" in out["unknown"]
    assert out["all"] == ["fakehost", "torchdiffeq", "torchode", "torchsde"]
    assert "brokenplug" not in out["plugins"] and {"torchdiffeq", "torchode", "torchsde", "fakehost"} <= set(out["plugins"])
    assert {"torchdiffeq", "torchode", "torchsde"} <= set(out["own"]) and "fakehost" not in out["own"]
    assert out["restored"]


# -- torchode: term.vf ------------------------------------------------------------------------------------

class Drift(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([[-0.5, 0.8], [-0.6, -0.2]], dtype=F64))

    def forward(self, t, y, args):
        return torch.tanh(y @ self.w.T) + args["shift"] * torch.cos(t)[:, None]


class ScaledTerm(to.ODETerm):
    """A term whose vf is not f: torchode's solvers see 1.5 f (and count through ODETerm.vf)."""

    def vf(self, t, y, stats, args):
        return 1.5 * super().vf(t, y, stats, args)


def _torchode_problem():
    y0 = torch.tensor([[1.0, -0.5], [0.2, 0.7]], dtype=F64)
    t_eval = torch.tensor([[0.0, 0.3, 1.0], [0.0, 0.6, 1.4]], dtype=F64)
    return y0, t_eval


def _torchode_solve(make_adjoint, controller, dt0=None):
    drift = Drift()
    term = ScaledTerm(drift, with_args=True)
    shift = torch.tensor(0.3, dtype=F64, requires_grad=True)
    y0, t_eval = _torchode_problem()
    y0 = y0.clone().requires_grad_(True)
    problem = to.InitialValueProblem(y0, t_eval[:, 0], t_eval[:, -1], t_eval)
    sol = make_adjoint(term, controller(term)).solve(problem, dt0=dt0, args={"shift": shift})
    grads = torch.autograd.grad((sol.ys ** 2).sum(), (y0, drift.w, shift))
    return sol.ys.detach(), grads


@pytest.mark.parametrize("kind", ["fixed", "adaptive", "quadrature"])
def test_torchode_adjoints_evaluate_an_overridden_term_vf(kind):
    # Reference: torchode's own AutoDiffAdjoint (autograd through its steps, which call term.vf).
    if kind == "fixed":
        def controller(term):
            return to.FixedStepController()
        dt0, tol = torch.tensor([0.05, 0.07], dtype=F64), (1e-12, 1e-11)
    else:
        def controller(term):
            return to.IntegralController(atol=1e-9, rtol=1e-9, term=term)
        # (AutoDiffAdjoint also differentiates the step-size control: ~3e-9 apart in the gradient)
        dt0, tol = None, ((1e-10, 1e-7) if kind == "adaptive" else (1e-10, 1e-6))
    ref = _torchode_solve(lambda term, c: to.AutoDiffAdjoint(to.Dopri5(term=term), c), controller, dt0)
    if kind == "quadrature":
        ours = _torchode_solve(lambda term, c: QuadratureAdjoint(term, to.Dopri5(term=term), c), controller, dt0)
    else:
        ours = _torchode_solve(lambda term, c: RampdeAdjoint(to.Dopri5(term=term), c), controller, dt0)
    torch.testing.assert_close(ours[0], ref[0], rtol=tol[0], atol=tol[0])
    for a, b in zip(ours[1], ref[1]):
        torch.testing.assert_close(a, b, rtol=tol[1], atol=tol[1])


def test_torchode_solve_ivp_with_a_rampde_method_evaluates_term_vf():
    # y' = 1.5 * (-y): exp(-1.5 t) (rk4 at h = 0.01: error ~1e-10); without vf it would be exp(-t).
    class Scaled(to.ODETerm):
        def vf(self, t, y, stats, args):
            return 1.5 * super().vf(t, y, stats, args)

    term = Scaled(lambda t, y: -y)
    t_eval = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    sol = to.solve_ivp(term, torch.ones(2, 1, dtype=F64), t_eval, method="rampde_rk4", dt0=0.01)
    torch.testing.assert_close(sol.ys[:, :, 0], torch.exp(-1.5 * t_eval).expand(2, 3), rtol=1e-9, atol=1e-9)


# -- create_graph through a quadrature adjoint ------------------------------------------------------------

class Exp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.5, dtype=F64))

    def forward(self, t, y):
        return self.a * y


def _second_order_refused(make, match):
    f = Exp()
    with pytest.raises(RuntimeError, match=match) as info:
        torch.autograd.grad(make(f).sum(), f.a, create_graph=True)
    assert "discrete adjoint" not in str(info.value)
    (g,) = torch.autograd.grad(make(f).sum(), f.a)  # first order still works: d/da e^a = e^a
    torch.testing.assert_close(g, torch.exp(f.a.detach()), rtol=1e-6, atol=0)


def test_create_graph_through_odeint_adjoint_names_the_quadrature_adjoint():
    from torchdiffeq import odeint_adjoint

    t = torch.tensor([0.0, 1.0], dtype=F64)
    _second_order_refused(
        lambda f: odeint_adjoint(f, torch.ones(1, dtype=F64), t, method="rampde_rk4", options={"step_size": 0.01})[-1],
        r"odeint_adjoint\(method='rampde_rk4'\) runs rampde's Gauss--Legendre quadrature adjoint, which provides "
        r"first-order gradients only.*create_graph=True.*use torchdiffeq.odeint with torchdiffeq's own method",
    )


def test_create_graph_through_torchodes_quadrature_adjoint_names_it():
    def make(f):
        term = to.ODETerm(lambda t, y: f(t, y))
        problem = to.InitialValueProblem(torch.ones(1, 1, dtype=F64), torch.zeros(1, dtype=F64),
                                         torch.ones(1, dtype=F64))
        adjoint = QuadratureAdjoint(term, to.Dopri5(term=term), to.IntegralController(1e-9, 1e-9, term=term),
                                    params=(f.a,))
        return adjoint.solve(problem).ys[:, -1]

    _second_order_refused(make, r"QuadratureAdjoint .* runs rampde's Gauss--Legendre quadrature adjoint.*"
                                r"create_graph=True.*torchode's AutoDiffAdjoint")


def test_create_graph_through_solves_quadrature_adjoint_names_it():
    t = torch.tensor([0.0, 1.0], dtype=F64)
    _second_order_refused(
        lambda f: rampde_plugins.solve(f, torch.ones(1, dtype=F64), t, method="rk4", step_size=0.01,
                                       adjoint="quadrature")[-1],
        r"adjoint='quadrature'\) runs rampde's Gauss--Legendre quadrature adjoint.*create_graph=True",
    )
