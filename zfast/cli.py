"""The zfast command line: a thin shell over zfast's library and the node API.

Errors are one line on stderr and a non-zero exit; --json output is one JSON
document on stdout.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

import click
import yaml

from zfast import __version__, config
from zfast.api import ApiError, Client

# Imported here is only what every command needs (click, the project file, the API
# client) and what that already loads. The rest is imported inside the command that
# uses it, marked PLC0415 with what it would cost here: a command pays only for its
# own machinery, so `zfast status` stays fast; and `zfast up` takes the node's lock
# and starts the data plane loading (zfast/node/prestart.py) before it imports the
# control plane.

RUN_DIR = Path("/run/zfast")


class Failure(click.ClickException):
    """An error that the CLI prints as one line, exit code 1."""

    def show(self, file=None):
        click.echo(f"zfast: error: {self.format_message()}", err=True)


def _fail(message: str) -> None:
    raise Failure(message)


def _load(path: str) -> config.Project:
    try:
        return config.load(path)
    except config.ConfigError as err:
        message = str(err)  # a problem with the file as a whole already names it
        _fail(message if message.startswith(f"{path}: ") else f"{path}: {message}")


def _state_dir(state_dir: str | None, config_file: str | None, node: str | None) -> Path:
    """Which node to talk to: --state-dir, the file's node, --node, or the only one running."""
    if state_dir:
        return Path(state_dir)
    if config_file:
        project = _load(config_file)
        if project.node is None:
            _fail(f"{config_file}: no node section")
        return Path(project.node.state_dir)
    if node:
        return RUN_DIR / node
    running = sorted(p.parent for p in RUN_DIR.glob("*/api.sock"))
    if len(running) == 1:
        return running[0]
    if not running:
        _fail("no zfast node is running here (start one with `zfast up -c FILE`)")
    _fail("several nodes run here; say which with --state-dir or --node: "
          + ", ".join(p.name for p in running))


def node_options(f):
    f = click.option("--node", help="Node name (state dir /run/zfast/NAME).")(f)
    f = click.option("-c", "--config", "config_file", type=click.Path(dir_okay=False),
                     help="Project file whose node to talk to.")(f)
    f = click.option("--state-dir", type=click.Path(file_okay=False),
                     help="State dir of the node (default /run/zfast/<node name>).")(f)
    return f


def _who() -> str:
    import getpass  # noqa: PLC0415 -- only commands that change

    return f"{getpass.getuser()}@{socket.gethostname()}"


def _fetch(state_dir, config_file, node, endpoint: str, as_json: bool):
    """GET endpoint of the node; with --json print it and return None, else return it."""
    try:
        data = _client(state_dir, config_file, node).get(endpoint)
    except ApiError as err:
        _fail(str(err))
    if as_json:
        click.echo(json.dumps(data))
        return None
    return data


def _client(state_dir, config_file, node) -> Client:
    return Client(_state_dir(state_dir, config_file, node))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="zfast")
def main():
    """zfast: an eBPF/XDP project balancer.

    \b
    Examples:
      zfast up -c project.yaml        run a node in the foreground
      zfast apply -c project.yaml     change the running node, hitless
      zfast stats --json              counters per service, backend, reason
      zfast demo                      a throw-away topology with real traffic
    """


DAEMON_NICE = -10


def _raise_priority() -> None:
    """A balancer daemon runs at nice -10, before it starts any thread (threads inherit
    it): its heartbeat thread shares the GIL with the others, and a daemon thread that
    holds the GIL while other programs keep it off a CPU delays the heartbeat past the
    peer's dead interval (seen in the pair tests as "frozen for 0.6 s" on a quiet machine)."""
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) > DAEMON_NICE:
            os.setpriority(os.PRIO_PROCESS, 0, DAEMON_NICE)
    except OSError:
        pass        # not root: ordinary priority


@main.command()
@click.option("-c", "--config", "config_file", required=True, type=click.Path(dir_okay=False),
              help="Project file (YAML).")
@click.option("-v", "--verbose", is_flag=True, help="Log what the node does.")
@click.option("--park", "template", type=click.Path(dir_okay=False, exists=True), hidden=True,
              help="Spare mode (the core service): compile for TEMPLATE's sizes, then wait "
                   "until the -c file exists and start as that node.")
def up(config_file, verbose, template):
    """Run one balancer node in the foreground until SIGTERM/SIGINT."""
    import logging  # noqa: PLC0415 -- only `up` logs

    from zfast.dataplane.loader import DatapathError  # noqa: PLC0415 -- the data plane

    _raise_priority()
    # Quiet until the node runs: a refusal is one line (the error below), nothing else.
    logging.basicConfig(level=logging.INFO if verbose else logging.CRITICAL,
                        format="%(asctime)s %(name)s %(message)s")
    preloaded = early = None
    if template:
        from zfast.core.spare import park  # noqa: PLC0415 -- the data plane
        preloaded, project = park(Path(template), Path(config_file))
        if project is None:
            return                      # stopped while parked
    project = _load(config_file)
    if preloaded is None and project.node is not None:
        # the lock, and the kernel's work on the data plane while the rest is imported
        from zfast.node.prestart import AlreadyRunning, Prestart  # noqa: PLC0415 -- see top
        try:
            early = Prestart(project)
        except AlreadyRunning as err:
            _fail(str(err))
    from zfast.node.daemon import Node, NodeError  # noqa: PLC0415 -- the control plane
    if early is not None and early.loading:
        # what the start's first steps import (Maglev tables), imported now, while the
        # kernel makes the maps and verifies the programs (not for a start that fails its
        # checks: a crash loop's tries stay cheap)
        import numpy  # noqa: F401, PLC0415
    try:
        node = Node(project, source=f"zfast up -c {config_file}", preloaded=preloaded,
                    prestart=early)
        changes = node.start()
    except BaseException as err:
        if early is not None:
            early.discard()
        if isinstance(err, (NodeError, DatapathError)):
            _fail(str(err))
        raise
    if not verbose:
        logging.getLogger().setLevel(logging.WARNING)  # role changes and the like, from now on
    atts = ", ".join(f"{a.ifname} ({a.hook} {a.mode}, prog {a.prog_id})" if a.hook == "xdp"
                     else f"{a.ifname} (tc, prog {a.prog_id})" for a in node.dp.attached.values())
    click.echo(f"zfast: node {node.name} up on {atts}; {len(changes)} change(s); "
               f"API at {node.state_dir}/api.sock", err=True)
    node.run()
    click.echo(f"zfast: node {node.name} stopped, interfaces detached", err=True)


@main.command()
@click.option("-c", "--config", "config_file", required=True, type=click.Path(dir_okay=False),
              help="Project file (YAML).")
@click.option("--state-dir", type=click.Path(file_okay=False), help="State dir of the node.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def apply(config_file, state_dir, as_json):
    """Send a project file to the running node; prints what changed."""
    # The node checks the whole file (and says every problem); checking it here as well
    # would double the time of a large apply. Only the node's state dir is read here.
    try:
        text = Path(config_file).read_text()
    except OSError as err:
        _fail(f"{config_file}: {err.strerror}")
    directory = Path(state_dir) if state_dir else _file_state_dir(config_file, text)
    try:
        result = Client(directory).post("/apply", {"config": text, "source": config_file,
                                                   "who": _who()})
    except ApiError as err:
        if not err.status:      # no node answered: say what is wrong with the file, if anything
            _load(config_file)
        _fail(f"{err}" + (": " + "; ".join(err.problems) if err.problems else ""))
    if as_json:
        click.echo(json.dumps(result))
        return
    for line in result["changes"] or ["no change"]:
        click.echo(line)


def _file_state_dir(config_file: str, text: str) -> Path:
    """node.state_dir (or /run/zfast/<node.name>) of a project file, read cheaply."""
    try:
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        node = (yaml.load(text, Loader=loader) or {}).get("node") or {}
        if node.get("state_dir") or node.get("name"):
            return Path(node.get("state_dir") or RUN_DIR / node["name"])
    except (yaml.YAMLError, AttributeError, TypeError):
        pass
    _load(config_file)  # the file is bad: every problem, one line
    _fail(f"{config_file}: no node section: say which node with --state-dir")


@main.command()
@node_options
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def status(state_dir, config_file, node, as_json):
    """Role, attached interfaces and modes, program ids, peer, controllers."""
    st = _fetch(state_dir, config_file, node, "/status", as_json)
    if st is None:
        return
    click.echo(f"node {st['node']} ({st['project']}): {st['role']}, revision {st['revision']}, pid {st['pid']}")
    for itf in st["interfaces"]:
        how = "tc" if itf["mode"] == "tc" else f"xdp {itf['mode']}"
        click.echo(f"  {itf['name']:<16} {how:<12} prog {itf['prog_id']:<6} {itf.get('why', '')}")
        if itf.get("egress"):
            click.echo(f"  {'':<16} egress: {itf['egress']}")
    click.echo(f"  peer: {st['peer'] or 'none (solo)'}")


def _print_stats(st: dict, prev: dict | None, interval: float) -> None:
    def rate(now: int, before: int | None) -> str:
        if before is None or interval <= 0:
            return ""
        return f"{(now - before) / interval:>10.0f} pps"

    prev_svc = {s["name"]: s for s in (prev or {}).get("services", [])}
    click.echo(f"{'service / backend':<32} {'packets':>12} {'bytes':>14}")
    for svc in st["services"]:
        before = prev_svc.get(svc["name"])
        click.echo(f"{svc['name'] + ' ' + (svc.get('vip') or ''):<32} {svc['packets']:>12} "
                   f"{svc['bytes']:>14} {rate(svc['packets'], before and before['packets'])}")
        prev_be = {b["address"]: b for b in (before or {}).get("backends", [])}
        for be in svc["backends"]:
            b0 = prev_be.get(be["address"])
            click.echo(f"  {be['address']:<30} {be['packets']:>12} {be['bytes']:>14} "
                       f"{rate(be['packets'], b0 and b0['packets'])}")
    verdicts = {k: v for k, v in st["verdicts"].items() if v["packets"]}
    if verdicts:
        click.echo("verdicts:")
        for name, v in verdicts.items():
            click.echo(f"  {name:<30} {v['packets']:>12} {v['bytes']:>14}")


@main.command()
@node_options
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@click.option("--watch", is_flag=True, help="Refresh every second with rates (Ctrl-C stops).")
@click.option("--since", help="Totals and rates (pps, p50, p99) since: 10m, 2h, 1d, or RFC 3339.")
def stats(state_dir, config_file, node, as_json, watch, since):
    """Packets and bytes per service, backend and verdict reason."""
    if since:
        from zfast.telemetry import seriesstore  # noqa: PLC0415 -- numpy
        try:
            summary = seriesstore.open_reader(_state_dir(state_dir, config_file, node)).summary(_since(since))
        except FileNotFoundError as err:
            _fail(f"no statistics stored yet: {err}")
        if as_json:
            click.echo(json.dumps(summary))
            return
        click.echo(f"{'service / backend':<32} {'packets':>12} {'pps':>9} {'p50':>9} {'p99':>9}")
        for svc in summary["services"]:
            click.echo(f"{svc['name']:<32} {svc['packets']:>12} {svc['pps']:>9.1f} "
                       f"{svc['p50_pps']:>9.1f} {svc['p99_pps']:>9.1f}")
            for be in svc.get("backends", []):
                click.echo(f"  {be['address']:<30} {be['packets']:>12} {be['pps']:>9.1f} "
                           f"{be['p50_pps']:>9.1f} {be['p99_pps']:>9.1f}")
        return
    client = _client(state_dir, config_file, node)
    prev = None
    try:
        while True:
            st = client.get("/stats")
            if as_json:
                click.echo(json.dumps(st))
            else:
                if watch:
                    click.clear()
                _print_stats(st, prev, st["time"] - prev["time"] if prev else 0)
            if not watch:
                return
            prev = st
            time.sleep(1)
    except ApiError as err:
        _fail(str(err))
    except KeyboardInterrupt:
        pass


@main.command()
@node_options
@click.option("--since", default="1h", show_default=True, help="10m, 2h, 1d, or RFC 3339.")
@click.option("-o", "--output", default="zfast-report.png", show_default=True,
              type=click.Path(dir_okay=False), help="The PNG to write.")
def report(state_dir, config_file, node, since, output):
    """A PNG of packets, drops and flows over time."""
    from zfast.telemetry import seriesstore  # noqa: PLC0415 -- numpy

    directory = _state_dir(state_dir, config_file, node)
    start = _since(since)
    try:
        reader = seriesstore.open_reader(directory)
    except FileNotFoundError as err:
        _fail(f"no statistics stored yet: {err}")
    series = reader.series(start, names=["service/*/packets", "backend/*/packets", "drop/*", "flows"])
    from zfast.telemetry import report as rep  # noqa: PLC0415 -- matplotlib (~0.5 s)
    click.echo(rep.render(series, output, since=start, until=time.time(), title=directory.name))


@main.command()
@node_options
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def history(state_dir, config_file, node, as_json):
    """Applied revisions: who, when, from where, what changed."""
    from zfast.events import rfc3339  # noqa: PLC0415 -- `history` only

    revs = _fetch(state_dir, config_file, node, "/history", as_json)
    if revs is None:
        return
    for r in revs:
        mark = "*" if r["applied"] else " "
        click.echo(f"{mark}{r['rev']:>5}  {rfc3339(r['time'])}  {r['who']:<20} {r['source']}")
        for line in r["changes"][:20]:
            click.echo(f"         {line}")
        if len(r["changes"]) > 20:
            click.echo(f"         ... {len(r['changes']) - 20} more")


@main.command()
@click.argument("rev", type=int)
@node_options
def rollback(rev, state_dir, config_file, node):
    """Apply revision REV again (as a new revision)."""
    try:
        result = _client(state_dir, config_file, node).post("/rollback", {"rev": rev, "who": _who()})
    except ApiError as err:
        _fail(f"{err}" + (": " + "; ".join(err.problems) if err.problems else ""))
    click.echo(f"revision {result['revision']}: " + ("; ".join(result["changes"]) or "no change"))


@main.command()
@node_options
def down(state_dir, config_file, node):
    """Remove everything a node made: its daemon, XDP programs, pinned maps."""
    from zfast.node.daemon import NodeError  # noqa: PLC0415 -- the control plane
    from zfast.node.daemon import down as node_down  # noqa: PLC0415 -- the control plane

    directory = Path(state_dir) if state_dir else _state_dir(None, config_file, node) \
        if (config_file or node) else None
    if directory is None:
        _fail("say which node: --state-dir, -c FILE or --node")
    try:
        done = node_down(directory)
    except NodeError as err:
        _fail(str(err))
    click.echo("; ".join(done) if done else f"nothing to remove for {directory}")


@main.group()
def fw():
    """The public ports' firewall: list, allow, deny, remove, test.

    \b
    Examples:
      zfast fw list
      zfast fw allow 2222 198.51.100.0/24
      zfast fw deny 2222 198.51.100.7/32
      zfast fw remove 2222 198.51.100.7/32
      zfast fw test 198.51.100.7 2222
    Changes edit the node's running project, exactly as `zfast apply` would.
    """


def _port_options(f):
    f = click.option("--proto", type=click.Choice(["tcp", "udp"]),
                     help="When the port number is used by tcp and udp.")(f)
    f = click.option("--address", help="When the port number is on several addresses.")(f)
    return node_options(f)


@fw.command("list")
@node_options
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def fw_list(state_dir, config_file, node, as_json):
    """Public ports, their policies, rules and counters."""
    data = _fetch(state_dir, config_file, node, "/fw", as_json)
    if data is None:
        return
    if data["project_deny"]:
        click.echo("project-wide deny: " + ", ".join(data["project_deny"]))
    counters = {(c["port"], c["proto"], c["address"]): c for c in data["counters"]}
    for p in data["ports"]:
        c = counters.get((p["port"], p["proto"], p["address"]), {})
        limit = f", limit {p['limit']['new_per_s']}/s burst {p['limit']['burst']}" if p["limit"] else ""
        click.echo(f"{p['address']}:{p['port']}/{p['proto']} -> {p['service']}: policy {p['policy']}{limit}; "
                   f"allowed {c.get('allowed', 0)}, denied {c.get('denied', 0)}")
        for kind in ("allow", "deny"):
            for cidr in p[kind]:
                click.echo(f"  {kind:<5} {cidr}")


def _fw_change(op, port, cidr, proto, address, state_dir, config_file, node):
    body = {"op": op, "port": port, "cidr": cidr, "proto": proto, "address": address, "who": _who()}
    try:
        result = _client(state_dir, config_file, node).post("/fw", body)
    except ApiError as err:
        _fail(f"{err}" + (": " + "; ".join(err.problems) if err.problems else ""))
    for line in result["changes"] or ["no change"]:
        click.echo(line)


def _fw_edit_command(op: str, doc: str):
    """zfast fw allow|deny|remove PORT CIDR: one shape, three verbs."""
    @click.argument("port", type=click.IntRange(1, 65535))
    @click.argument("cidr")
    @_port_options
    def command(port, cidr, proto, address, state_dir, config_file, node):
        _fw_change(op, port, cidr, proto, address, state_dir, config_file, node)

    command.__doc__ = doc
    return fw.command(op)(command)


_fw_edit_command("allow", "Allow CIDR on public port PORT.")
_fw_edit_command("deny", "Deny CIDR on public port PORT.")
_fw_edit_command("remove", "Remove CIDR from PORT's allow and deny lists.")


@fw.command("test")
@click.argument("src")
@click.argument("port", type=click.IntRange(1, 65535))
@_port_options
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def fw_test(src, port, proto, address, state_dir, config_file, node, as_json):
    """Which rule decides for source SRC on public port PORT, and why."""
    try:
        result = _client(state_dir, config_file, node).post(
            "/fw/test", {"src": src, "port": port, "proto": proto, "address": address})
    except ApiError as err:
        _fail(str(err))
    if as_json:
        click.echo(json.dumps(result))
        return
    rule = f" by {result['rule']}" if result["rule"] else ""
    click.echo(f"{src} -> {result['address']}:{port}/{result['proto']}: {result['verdict'].upper()}"
               f"{rule} ({result['why']})")


@main.command()
@node_options
@click.option("--json", "as_json", is_flag=True, help="JSON Lines, one event a line.")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new events.")
@click.option("--since", help="Only events since: 10m, 2h, 1d, or an RFC 3339 time.")
def logs(state_dir, config_file, node, as_json, follow, since):
    """The node's event log."""
    from zfast.controllers import logger as evlog  # noqa: PLC0415 -- logging

    directory = _state_dir(state_dir, config_file, node)
    start = _since(since) if since else None
    try:
        for ev in (evlog.follow(directory, since=start) if follow else evlog.read(directory, start)):
            if as_json:
                click.echo(json.dumps(ev))
            else:
                rest = {k: v for k, v in ev.items() if k not in ("time", "node", "kind")}
                click.echo(f"{ev['time']} {ev['node']} {ev['kind']:<9} "
                           + " ".join(f"{k}={json.dumps(v)}" for k, v in rest.items()))
    except KeyboardInterrupt:
        pass


def _since(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text[-1:] in units and text[:-1].isdigit():
        return time.time() - int(text[:-1]) * units[text[-1]]
    from zfast.events import parse_time  # noqa: PLC0415 -- --since TIME only
    try:
        return parse_time(text)
    except ValueError:
        _fail(f"--since {text!r}: give 10m, 2h, 1d or an RFC 3339 time")


CORE_DIR_OPTION = click.option("--state-dir", type=click.Path(file_okay=False),
                               default="/run/zfast/core", show_default=True,
                               help="State dir of the core service.")


@main.group()
def core():
    """A project's whole core service on this host (the balancer pair and the routers as
    instances)."""


@core.command("up")
@click.option("-c", "--config", "config_file", required=True, type=click.Path(dir_okay=False))
@CORE_DIR_OPTION
def core_up(config_file, state_dir):
    """Run the core service in the foreground; SIGTERM removes every instance it made."""
    from zfast.core.service import CoreError, CoreService  # noqa: PLC0415 -- all of zfast

    project = _load(config_file)
    try:
        svc = CoreService(project, Path(state_dir))
        svc.up()
    except (CoreError, OSError) as err:
        _fail(str(err))
    click.echo(f"zfast: core service of {project.project} up: "
               + ", ".join(f"{i.spec.name} ({i.netns})" for i in svc.instances.values()), err=True)
    svc.run()
    click.echo("zfast: core service stopped, instances removed", err=True)


@core.command("status")
@CORE_DIR_OPTION
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def core_status(state_dir, as_json):
    """Every instance of the core service and each controller's last decision."""
    try:
        st = Client(Path(state_dir)).get("/status")
    except ApiError as err:
        _fail(str(err))
    if as_json:
        click.echo(json.dumps(st))
        return
    click.echo(f"project {st['project']}")
    for i in st["instances"]:
        where = f" on {i['member']}" if i.get("member") else ""
        click.echo(f"  {i['name']:<6} {i['kind']:<9} {str(i['role']):<8} pid {i['pid']}{where} "
                   f"cpu {i['cpu']} mem {i['memory'] >> 20} MiB restarts {i['restarts']} "
                   f"{'healthy' if i['healthy'] else 'UNHEALTHY: ' + '; '.join(i['problems'])}")
    for name, d in st["controllers"].items():
        click.echo(f"  {name}: {json.dumps(d) if d else 'no decision yet'}")


@core.command("stats")
@CORE_DIR_OPTION
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def core_stats(state_dir, as_json):
    """Counters of every instance: balancers per service/backend, routers per upstream."""
    try:
        st = Client(Path(state_dir)).get("/stats")
    except ApiError as err:
        _fail(str(err))
    if as_json:
        click.echo(json.dumps(st))
        return
    for name, inst in st["instances"].items():
        if "error" in inst:
            click.echo(f"{name} ({inst['kind']}): {inst['error']}")
            continue
        click.echo(f"{name} ({inst['kind']})")
        for svc in inst.get("services", []):
            click.echo(f"  service {svc['name']:<20} packets {svc['packets']:>12} bytes {svc['bytes']:>14}")
        for up, u in (inst.get("upstreams") or {}).items():
            click.echo(f"  upstream {up:<19} requests {u.get('requests', 0):>11} "
                       f"bytes out {u.get('bytes_out', 0):>12} {u.get('status', '')}")


@core.command("apply")
@click.option("-c", "--config", "config_file", required=True, type=click.Path(dir_okay=False))
@CORE_DIR_OPTION
def core_apply(config_file, state_dir):
    """Change the running core service (services, ports, firewall, domains): all or nothing."""
    try:
        text = Path(config_file).read_text()
    except OSError as err:
        _fail(f"{config_file}: {err.strerror}")
    try:
        result = Client(Path(state_dir)).post("/apply", {"config": text, "source": config_file,
                                                         "who": _who()})
    except ApiError as err:
        _fail(f"{err}" + (": " + "; ".join(err.problems) if err.problems else ""))
    click.echo(f"revision {result['revision']}")


@main.group(invoke_without_command=True)
@CORE_DIR_OPTION
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@click.pass_context
def certs(ctx, state_dir, as_json):
    """The routing service's certificates (host, issuer, serial, expiry, source, renewal)."""
    if ctx.invoked_subcommand is not None:
        return
    try:
        rows = Client(Path(state_dir)).get("/certs")
    except ApiError as err:
        _fail(str(err))
    if as_json:
        click.echo(json.dumps(rows))
        return
    if not rows:
        click.echo("no certificates")
    for c in rows:
        error = f"  last error: {c['last_error']}" if c.get("last_error") else ""
        click.echo(f"{c['host']:<32} {c['source']:<11} {c['issuer'][:30]:<30} serial {c['serial'][:16]} "
                   f"expires {c['not_after']} renew {c['renew_at']}{error}")


@certs.command("renew")
@click.argument("host")
@CORE_DIR_OPTION
def certs_renew(host, state_dir):
    """Renew HOST's certificate now (ACME hosts through ACME)."""
    try:
        c = Client(Path(state_dir), timeout=120).post("/certs/renew", {"host": host})
    except ApiError as err:
        _fail(str(err))
    click.echo(f"{c['host']}: new certificate from {c['issuer']} (serial {c['serial'][:16]}, "
               f"expires {c['not_after']})")


@main.command()
@click.argument("iface")
@click.option("--mode", type=click.Choice(["native", "generic", "tc", "auto"]), default="auto",
              show_default=True,
              help="native/generic: XDP in that mode; tc: tc ingress; auto: tc on a virtual link "
                   "(veth, bridge), else native XDP, then generic.")
def attach(iface, mode):
    """Load the data plane on IFACE without a config (no services: everything passes)."""
    from zfast.dataplane import loader  # noqa: PLC0415 -- the data plane

    try:
        loader.ifindex(iface)
        dp = loader.Loaded()
        att = dp.attach(iface, mode)
    except loader.DatapathError as err:
        _fail(str(err))
    click.echo(f"attached zfast (prog {att.prog_id}) to {iface}: "
               f"{'tc ingress' if att.hook == 'tc' else f'XDP, {att.mode} mode'} ({att.why})")


@main.command()
@click.argument("iface")
def detach(iface):
    """Unload whatever XDP program, and zfast's tc filter, is on IFACE."""
    from zfast.dataplane import loader  # noqa: PLC0415 -- the data plane

    try:
        before = loader.attached_prog(iface)
        loader.detach_interface(iface)
    except loader.DatapathError as err:
        _fail(str(err))
    if before is None:
        click.echo(f"{iface}: no XDP program or zfast tc filter was attached")
    else:
        click.echo(f"detached prog {before[0]} ({before[1]}) from {iface}")


@main.command()
@click.option("--duration", type=float, default=20.0, show_default=True,
              help="Seconds of traffic.")
@click.option("--connections", type=int, default=300, show_default=True,
              help="TCP connections the client makes.")
def demo(duration, connections):
    """Build a throw-away topology (client, balancer, three backends), run real traffic
    through it with live stats, then tear everything down."""
    from zfast.lab import demo as demo_mod  # noqa: PLC0415 -- the lab

    try:
        demo_mod.run(duration=duration, connections=connections)
    except demo_mod.DemoError as err:
        _fail(str(err))


@main.group()
def cache():
    """The compiled-program cache: one entry per kernel, source and sizes (a balancer
    then starts without compiling). The dir is $ZFAST_CACHE_DIR or /var/cache/zfast."""


@cache.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def cache_list(as_json):
    """The entries, most recently used first, each verified."""
    from zfast.dataplane import progcache  # noqa: PLC0415 -- the data plane

    d = progcache.cache_dir()
    entries = progcache.list_entries(d)
    total = sum(e["bytes"] for e in entries)
    if as_json:
        click.echo(json.dumps({"dir": str(d), "bytes": total, "max_bytes": progcache.MAX_BYTES,
                               "entries": entries}))
        return
    click.echo(f"{len(entries)} entries, {total / 1024:.0f} KiB of "
               f"{progcache.MAX_BYTES >> 20} MiB, in {d}")
    for e in entries:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e["used"]))
        if not e["valid"]:
            click.echo(f"  {e['key'][:16]}  invalid: {e['reason']}")
            continue
        sizes = " ".join(f[5:] for f in e["cflags"] if f.startswith("-DZF_"))
        click.echo(f"  {e['key'][:16]}  used {used}  {e['bytes'] / 1024:.0f} KiB  "
                   f"kernel {e['release']}  bcc {e['bcc']}  {','.join(e['programs'])} "
                   f"({e['instructions']} insns, {e['maps']} maps)  {sizes}")


@cache.command("warm")
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False),
              help="Project file whose datapath sizes to compile for (default: the defaults).")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def cache_warm(config_path, as_json):
    """Compile the data plane into the cache unless it is there: the balancers that start
    after it (any node, any flow-table size) load it without LLVM."""
    from zfast.dataplane import progcache  # noqa: PLC0415 -- the data plane
    from zfast.dataplane.loader import DatapathError, warm  # noqa: PLC0415 -- the data plane

    try:
        sizes = config.load(config_path).datapath if config_path else config.Datapath()
        status, seconds, key = warm(sizes)
    except (config.ConfigError, DatapathError, OSError) as err:
        _fail(str(err))
    if as_json:
        click.echo(json.dumps({"dir": str(progcache.cache_dir()), "key": key, "status": status,
                               "seconds": round(seconds, 3)}))
        return
    said = {"hit": "already in the cache", "miss": f"compiled in {seconds:.1f} s",
            "off": f"compiled in {seconds:.1f} s, not cached (the cache dir is not usable)"}
    click.echo(f"zfast: program {key[:16]}: {said[status]} ({progcache.cache_dir()})")
    if status == "off":
        sys.exit(1)


@cache.command("clear")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def cache_clear(as_json):
    """Remove every entry: the next start of a balancer compiles."""
    from zfast.dataplane import progcache  # noqa: PLC0415 -- the data plane

    d = progcache.cache_dir()
    removed = progcache.clear(d)
    if as_json:
        click.echo(json.dumps({"dir": str(d), "removed": removed}))
    else:
        click.echo(f"removed {removed} entries from {d}")


if __name__ == "__main__":
    main()
