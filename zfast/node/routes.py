"""The node's control API (docs/openapi.yaml describes each endpoint): each handler
takes the request's JSON body and returns (HTTP status, JSON answer). Every change
goes through Node.apply, the same way as `zfast apply`.
"""

from __future__ import annotations

import json
from functools import partial
from typing import TYPE_CHECKING

import yaml

from zfast import config
from zfast.dataplane.loader import DatapathError
from zfast.node.checks import NodeError
from zfast.node.revisions import history, node_project, shared_of
from zfast.reconcile.firewall import explain
from zfast.store import StoreError

if TYPE_CHECKING:     # the node imports this module
    from zfast.node.daemon import Node


def routes(node: Node) -> dict:
    """(method, path) -> handler(body)."""
    # at the end of a start, as the statistics controller is (zfast/node/daemon.py): a
    # start that fails its checks (a crash loop's) never imports it
    from zfast.controllers import statistics  # noqa: PLC0415
    return {
        **statistics.api_routes(node.statistics),
        ("GET", "/status"): lambda _: (200, node.status()),
        ("GET", "/stats"): lambda _: (200, node.stats()),
        ("POST", "/apply"): partial(apply_file, node),
        ("GET", "/fw"): lambda _: (200, fw_list(node)),
        ("POST", "/fw"): partial(fw_change, node),
        ("POST", "/fw/test"): partial(fw_test, node),
        ("GET", "/history"): lambda _: (200, history(node.store, node.project.project,
                                                     node.revision)),
        ("POST", "/rollback"): partial(rollback, node),
    }


def apply_file(node: Node, body: dict | None):
    text = (body or {}).get("config")
    if not isinstance(text, str):
        return 400, {"error": "apply needs {\"config\": \"<YAML text>\"}"}
    try:
        source = (body or {}).get("source", "<api>")
        project = config.loads(text, source=source)
        changes = node.apply(project, (body or {}).get("who", "api"), source, text)
    except config.ConfigError as err:
        return 400, {"error": f"{len(err.problems)} problem(s) in the file", "problems": err.problems}
    except yaml.YAMLError as err:
        return 400, {"error": f"not YAML: {err}"}
    except (NodeError, DatapathError) as err:
        return 409, {"error": str(err)}
    return 200, {"revision": node.revision, "changes": changes}


def rollback(node: Node, body: dict | None):
    rev = (body or {}).get("rev")
    if not isinstance(rev, int):
        return 400, {"error": "rollback needs {\"rev\": N}"}
    try:
        old = node.store.get(node.project.project, rev)
    except KeyError:
        return 404, {"error": f"no revision {rev} (see zfast history)"}
    except StoreError as err:
        return 503, {"error": str(err)}
    shared = shared_of(old.config)
    try:
        project = node_project(shared, node.local_raw, f"revision {rev}")
        changes = node.apply(project, (body or {}).get("who", "api"), f"rollback to {rev}")
    except config.ConfigError as err:
        return 400, {"error": f"revision {rev} is not valid here", "problems": err.problems}
    except (NodeError, DatapathError) as err:
        return 409, {"error": str(err)}
    return 200, {"revision": node.revision, "changes": changes}


# ---- firewall edits (zfast fw): the same state as apply ---------------------

def find_port(project: config.Project, body: dict) -> tuple[int, config.PublicPort]:
    """The public port a fw request names: by port, and proto or address if it takes them."""
    matches = [(i, pp) for i, pp in enumerate(project.public_ports)
               if pp.port == body.get("port")
               and body.get("proto") in (None, pp.proto)
               and body.get("address") in (None, str(pp.address))]
    if not matches:
        raise NodeError(f"no public port {body.get('port')} "
                        f"(have: {', '.join(str(pp.port) for pp in project.public_ports) or 'none'})")
    if len(matches) > 1:
        raise NodeError(f"public port {body.get('port')} is ambiguous: give --proto or --address")
    return matches[0]


def fw_list(node: Node) -> dict:
    ports = []
    for pp in node.project.public_ports:
        fw = pp.firewall
        ports.append({"port": pp.port, "proto": pp.proto, "address": str(pp.address),
                      "service": pp.service, "policy": fw.policy,
                      "allow": [str(n) for n in fw.allow], "deny": [str(n) for n in fw.deny],
                      "limit": ({"new_per_s": fw.limit.new_per_s, "burst": fw.limit.burst}
                                if fw.limit else None)})
    return {"project_deny": [str(n) for n in node.project.project_deny], "ports": ports,
            "rules": node.fw.rule_counters(), "counters": node.fw.counters()}


def fw_change(node: Node, body: dict | None):
    body = body or {}
    op, cidr = body.get("op"), body.get("cidr")
    if op not in ("allow", "deny", "remove") or not isinstance(cidr, str):
        return 400, {"error": "fw needs {op: allow|deny|remove, port, cidr}"}
    try:
        i, _ = find_port(node.project, body)
    except NodeError as err:
        return 404, {"error": str(err)}
    raw = json.loads(json.dumps(node.project.raw, default=str))
    fw = raw["public_ports"][i].setdefault("firewall", {})
    lists = {k: [c for c in fw.get(k, []) if c != cidr] for k in ("allow", "deny")}
    if op == "remove" and all(cidr not in fw.get(k, []) for k in ("allow", "deny")):
        return 404, {"error": f"{cidr} is in neither list of port {body.get('port')}"}
    if op != "remove":
        lists[op].append(cidr)
    fw.update(lists)
    try:
        project = config.parse(raw, source="zfast fw")
        changes = node.apply(project, body.get("who", "api"),
                             f"zfast fw {op} {body.get('port')} {cidr}")
    except config.ConfigError as err:
        return 400, {"error": f"{len(err.problems)} problem(s)", "problems": err.problems}
    except (NodeError, DatapathError) as err:
        return 409, {"error": str(err)}
    return 200, {"revision": node.revision, "changes": changes}


def fw_test(node: Node, body: dict | None):
    body = body or {}
    try:
        _, pp = find_port(node.project, body)
        result = explain(node.project, str(body.get("src")), pp)
    except NodeError as err:
        return 404, {"error": str(err)}
    except ValueError:
        return 400, {"error": f"{body.get('src')!r} is not an IP address"}
    return 200, {"port": pp.port, "proto": pp.proto, "address": str(pp.address),
                 "src": body.get("src"), **result}
