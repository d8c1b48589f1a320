"""The CLI's shell, without root and without a kernel: help texts, and a bad project file
refused with every problem on one line before anything is loaded or attached."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from zfast import cli
from zfast.dataplane import loader
from zfast.node import daemon


def _commands(group: click.Group, prefix: tuple[str, ...] = ()):
    """Every command path of the CLI: ("up",), ("core", "up"), ..."""
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        yield prefix + (name,)
        if isinstance(command, click.Group):
            yield from _commands(command, prefix + (name,))


COMMANDS = sorted(_commands(cli.main))


def test_the_contract_commands_are_there():
    for command in ["up", "apply", "status", "stats", "attach", "detach", "demo"]:
        assert (command,) in COMMANDS


def test_main_help():
    result = CliRunner().invoke(cli.main, ["--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    for (name, *_) in COMMANDS:
        assert name in result.output


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help(command):
    result = CliRunner().invoke(cli.main, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert f"Usage: main {' '.join(command)}" in result.output or "Usage:" in result.output
    assert result.exception is None


BAD = """\
project: lab
node:
  name: lb-test
  state_dir: {state_dir}
  interfaces: [{{name: eth0, role: public}}]
services:
  - name: app
    vip: 10.0.0.300
    ports: [{{port: 0, proto: tcp, target_port: 70000}}, {{port: 80, proto: sctp}}]
    backends: []
  - name: web
    vip: 10.0.0.11
    ports: [{{port: 80, proto: tcp}}]
    backends: [{{address: "fd01::2", weight: -1}}]
    colour: blue
"""

PROBLEMS = [
    'services.app.vip: "10.0.0.300" is not an IP address',
    "services.app.ports[0].port: 0 is not a port",
    "services.app.ports[0].target_port: 70000 is not a port",
    'services.app.ports[1].proto: "sctp" is not one of',
    "services.app.backends: has no backends",
    "services.web.backends[0].weight: -1 is out of range",
    "services.web.colour: unknown field",
]


@pytest.fixture
def no_kernel(monkeypatch):
    """Fail the test if the CLI gets as far as loading or attaching anything."""
    def touched(*args, **kwargs):
        raise AssertionError("the CLI touched the kernel for a bad file")

    monkeypatch.setattr(daemon.Node, "__init__", touched)
    monkeypatch.setattr(daemon.Node, "start", touched)
    monkeypatch.setattr(loader.Loaded, "__init__", touched)
    monkeypatch.setattr(loader, "_bcc", touched)


def test_up_bad_file_every_problem_on_one_line(tmp_path, no_kernel):
    state_dir = tmp_path / "state"
    path = tmp_path / "bad.yaml"
    path.write_text(BAD.format(state_dir=state_dir))
    result = CliRunner().invoke(cli.main, ["up", "-c", str(path)])
    assert result.exit_code != 0
    assert not isinstance(result.exception, AssertionError), result.exception
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith(f"zfast: error: {path}: "), line
    for problem in PROBLEMS:
        assert problem in line, f"{problem!r} missing from {line!r}"
    assert not state_dir.exists(), "a refused file must not even create the state dir"


def test_up_yaml_syntax_error_one_line(tmp_path, no_kernel):
    path = tmp_path / "broken.yaml"
    path.write_text("project: lab\nnode: {name: a\nservices: [\n")
    result = CliRunner().invoke(cli.main, ["up", "-c", str(path)])
    assert result.exit_code != 0
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"zfast: error: {path}: line "), lines[0]
    assert "not valid YAML" in lines[0]
    assert lines[0].count(str(path)) == 1, lines[0]


def test_up_missing_file(tmp_path, no_kernel):
    result = CliRunner().invoke(cli.main, ["up", "-c", str(tmp_path / "nothere.yaml")])
    assert result.exit_code != 0
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "nothere.yaml" in lines[0] and "cannot read" in lines[0], lines


def test_apply_bad_file_needs_no_node(tmp_path):
    """apply refuses a bad file itself: no node is asked (none runs here)."""
    path = tmp_path / "bad.yaml"
    path.write_text(BAD.format(state_dir=tmp_path / "state"))
    result = CliRunner().invoke(cli.main, ["apply", "-c", str(path),
                                           "--state-dir", str(tmp_path / "state")])
    assert result.exit_code != 0
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert all(problem in lines[0] for problem in PROBLEMS), lines[0]
    assert "no zfast node" not in lines[0]
