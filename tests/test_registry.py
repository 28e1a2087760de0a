import importlib.metadata as md
import types

import pytest

import toolkit
from toolkit import hookimpl
from toolkit.errors import PluginError


def plugin(**hooks):
    """A fake plugin module with the given hook implementations."""
    mod = types.ModuleType("fake_plugin")
    for name, fn in hooks.items():
        setattr(mod, name, hookimpl(fn))
    return mod


def sampler_factory():
    return toolkit.create("sampler", "diffusion-toolkit:ddim")


def builtin(kind):
    import toolkit.registry

    reg = toolkit.registry.get_registry()
    return sorted(e.name for e in reg.entries[toolkit.registry.normalize_kind(kind)] if e.dist == "diffusion-toolkit")


SAMPLERS = ["ddim", "ddpm", "dpmpp-2m", "euler-a", "heun", "unipc"]


def test_builtins_listed():
    assert builtin("schedule") == ["cosine", "diffusers", "linear"]  # diffusers: the beta schedules of diffusers folders
    assert builtin("samplers") == SAMPLERS
    assert {"cosine", "linear"} <= set(toolkit.available("schedule"))
    assert {"unet", "mlp"} <= set(toolkit.available("model"))
    assert {"digits", "folder", "array", "moons", "swissroll", "gaussians8"} <= set(toolkit.available("dataset"))


def test_unknown_name_lists_available():
    with pytest.raises(PluginError, match=r"unknown sampler 'nope'; available: .*ddim, ddpm, dpmpp-2m"):
        toolkit.create("sampler", "nope")
    with pytest.raises(PluginError, match="unknown plugin kind"):
        toolkit.available("widgets")


def test_duplicate_name_names_both_distributions(fresh_registry):
    def reg(register):
        register("ddim", sampler_factory)

    fresh_registry.register_plugin(plugin(register_samplers=reg), "dup", dist="other-dist", version="1.2")
    with pytest.raises(PluginError, match=r"diffusion-toolkit.*other-dist.*diffusion-toolkit:ddim, other-dist:ddim"):
        toolkit.create("sampler", "ddim")
    assert toolkit.create("sampler", "diffusion-toolkit:ddim").name == "ddim"
    assert toolkit.create("sampler", "other-dist:ddim").name == "ddim"


@pytest.mark.parametrize("exc", [RuntimeError("boom"), SystemExit("boom")])
def test_hook_that_raises_is_isolated(fresh_registry, exc):
    """A hook that raises, or calls sys.exit (which would end every command silently), is skipped and listed."""
    def reg(register):
        raise exc

    fresh_registry.register_plugin(plugin(register_samplers=reg), "bad", dist="bad-dist")
    with pytest.warns(RuntimeWarning, match="bad"):
        names = toolkit.available("sampler")
    assert names == SAMPLERS
    failures = fresh_registry.get_registry().failures
    assert [f.plugin for f in failures] == ["bad"] and "boom" in failures[0].error


def test_strict_mode_reraises(fresh_registry, monkeypatch):
    def reg(register):
        raise RuntimeError("boom")

    monkeypatch.setenv("TOOLKIT_STRICT_PLUGINS", "1")
    fresh_registry.register_plugin(plugin(register_samplers=reg), "bad", dist="bad-dist")
    with pytest.raises(RuntimeError, match="boom"):
        toolkit.available("sampler")


class BrokenEntryPoint:
    name = "broken"
    dist = types.SimpleNamespace(name="broken-dist", version="0.0.1")

    def load(self):
        raise ImportError("No module named 'missing_dependency'")


def test_plugin_that_fails_to_import(fresh_registry, monkeypatch):
    real = fresh_registry._entry_points
    monkeypatch.setattr(fresh_registry, "_entry_points", lambda: [BrokenEntryPoint(), *real()])
    with pytest.warns(RuntimeWarning, match="broken"):
        reg = fresh_registry.get_registry()
    assert reg.failures[0].dist == "broken-dist" and "missing_dependency" in reg.failures[0].error
    assert toolkit.available("sampler") == SAMPLERS


def test_disable_plugins(fresh_registry, monkeypatch):
    monkeypatch.setenv("TOOLKIT_DISABLE_PLUGINS", "samplers,solvers")
    assert toolkit.available("sampler") == []
    assert toolkit.available("schedule") == ["cosine", "diffusers", "linear"]


def test_misspelled_hook_fails_loudly(fresh_registry):
    def register_sampler(register):  # missing the s
        pass

    fresh_registry.register_plugin(plugin(register_sampler=register_sampler), "typo", dist="typo-dist")
    with pytest.warns(RuntimeWarning, match=r"'typo' \(typo-dist\) implements an unknown hook.*register_sampler"):
        assert toolkit.available("sampler") == SAMPLERS
    assert fresh_registry.get_registry().failures[0].plugin == "typo"


def test_wrong_hook_signature_is_rejected(fresh_registry, monkeypatch):
    def register_samplers(register, extra):
        pass

    monkeypatch.setenv("TOOLKIT_STRICT_PLUGINS", "1")
    fresh_registry.register_plugin(plugin(register_samplers=register_samplers), "sig", dist="sig-dist")
    with pytest.raises(Exception, match="extra"):
        toolkit.available("sampler")


def test_factory_not_following_protocol(fresh_registry):
    def reg(register):
        register("half", lambda: types.SimpleNamespace(name="half", stochastic=False))

    fresh_registry.register_plugin(plugin(register_samplers=reg), "half", dist="half-dist")
    with pytest.raises(PluginError, match=r"Sampler protocol: missing init_state, plan, step"):
        toolkit.create("sampler", "half")


def test_entries_record_distribution():
    entry = toolkit.registry.get_registry().lookup("sampler", "ddim")
    assert entry.dist == "diffusion-toolkit" and entry.version == md.version("diffusion-toolkit")


class ExitingEntryPoint(BrokenEntryPoint):
    name = "exits"

    def load(self):
        raise SystemExit(3)


def test_a_plugin_that_exits_at_import_is_contained(fresh_registry, monkeypatch):
    real = fresh_registry._entry_points
    monkeypatch.setattr(fresh_registry, "_entry_points", lambda: [ExitingEntryPoint(), *real()])
    with pytest.warns(RuntimeWarning, match="exits"):
        names = toolkit.available("sampler")
    assert names == SAMPLERS
    assert [f.plugin for f in fresh_registry.get_registry().failures] == ["broken-dist:exits"]


@pytest.mark.filterwarnings("ignore:toolkit plugin")
def test_a_plugin_adds_commands_and_may_not_take_a_builtin_name(fresh_registry):
    import click

    from helpers import run

    def register_commands(cli):
        @cli.command("hello")
        @click.argument("name")
        def hello(name):
            """Say hello."""
            click.echo(f"hello {name}")

    def takes_compose(cli):
        @cli.command("compose")
        def compose():
            click.echo("hijacked")

    fresh_registry.register_plugin(plugin(register_commands=register_commands), "greet", dist="greet-dist")
    fresh_registry.register_plugin(plugin(register_commands=takes_compose), "thief", dist="thief-dist")
    r = run("hello", "world")
    assert r.exit_code == 0 and r.output == "hello world\n"
    assert "hello" in run("--help").output
    failures = fresh_registry.get_registry().failures
    assert [f.plugin for f in failures] == ["thief"]
    assert "adds the command 'compose', which a built-in command already has" in failures[0].error
    assert "hijacked" not in run("compose", "--help").output
    assert run("nope").exit_code == 2
