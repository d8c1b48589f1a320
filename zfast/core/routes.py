"""The core service's HTTP API (a Unix socket in its state dir; zfast/api.py).

    GET  /status       every instance (role, health, sizes) and each controller's last decision
    GET  /stats        every instance's own counters
    GET  /certs        the routing service's certificates
    POST /certs/renew  {"host"}: renew one now
    POST /apply        {"config", "source", "who"}: a new project file, all or nothing
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import yaml

from zfast import config
from zfast.api import ApiError, Client
from zfast.core.observe import API_TIMEOUT_S
from zfast.routing.certs import CertError

if TYPE_CHECKING:      # the service imports this module: only its type from there
    from zfast.core.service import CoreService


def routes(svc: CoreService) -> dict:
    return {
        ("GET", "/status"): lambda _: (200, status(svc)),
        ("GET", "/certs"): lambda _: (200, svc.renewal.certs() if svc.renewal else []),
        ("GET", "/stats"): lambda _: (200, stats(svc)),
        ("POST", "/certs/renew"): lambda body: renew(svc, body),
        ("POST", "/apply"): lambda body: apply(svc, body),
    }


def status(svc: CoreService) -> dict:
    launcher, repair = svc.launcher, svc.repair
    out = []
    for name, inst in list(launcher.instances.items()):
        role = None
        try:
            role = Client(inst.spec.state_dir, timeout=0.5).get("/status").get("role")
            svc.observer.answered.add(name)     # it has answered: from now on silence is a fault
        except ApiError:
            pass
        health = repair.health_of(name, inst.started)
        out.append({
            "name": name, "kind": inst.spec.kind, "role": role, "pid": inst.pid,
            "netns": inst.netns,
            "member": inst.member,        # the LXD cluster member (None: this host)
            "addresses": [a for link in inst.spec.links for a in link.addresses],
            "cpu": inst.spec.cpu, "memory": inst.spec.memory,
            "flow_table": inst.spec.config.get("datapath", {}).get("flow_table"),
            "healthy": not health.problems, "problems": health.problems,
            "restarts": inst.restarts, "started": inst.started,
            "healthy_since": health.healthy_at,
            "boosted": name in launcher.boosted,    # starting with more CPU than "cpu"
        })
    return {"project": svc.project.project, "instances": out,
            "spare": launcher.spare.spec.name if launcher.spare else None,
            "spare_ready": launcher.spare_ready(),
            "resizing": svc.resizer.resizing,
            "drained": sorted(repair.drained),
            "controllers": {"repair": repair.decision or {},
                            "scaling": svc.resizer.decision or {}}}


def stats(svc: CoreService) -> dict:
    """Every instance's own counters: a balancer's services, backends and verdicts; a
    router's requests and bytes per upstream and server."""
    out = {}
    for name, inst in list(svc.instances.items()):
        try:
            out[name] = {"kind": inst.spec.kind,
                         **Client(inst.spec.state_dir, timeout=API_TIMEOUT_S * 2).get("/stats")}
        except ApiError as err:
            out[name] = {"kind": inst.spec.kind, "error": str(err)}
    return {"project": svc.project.project, "instances": out}


def renew(svc: CoreService, body: dict | None):
    host = (body or {}).get("host")
    if svc.renewal is None:
        return 404, {"error": "this project has no routing service"}
    try:
        host = config.parse_host(host)
    except (ValueError, TypeError) as err:
        return 400, {"error": f"{host!r}: {err}"}
    if host not in svc.renewal.hosts():
        return 404, {"error": f"{host} is not one of routing.domains"}
    try:
        return 200, svc.renewal.renew(host).public()
    except CertError as err:
        return 502, {"error": str(err)}


def apply(svc: CoreService, body: dict | None):
    """`zfast core apply`: a new project file for the whole core service (services,
    ports, firewall, domains); the core section itself must not change."""
    try:
        raw = yaml.safe_load((body or {}).get("config", ""))
        project = config.parse(raw, source=(body or {}).get("source", "<api>"))
    except (config.ConfigError, yaml.YAMLError) as err:
        problems = getattr(err, "problems", [str(err)])
        return 400, {"error": "the file is not valid", "problems": problems}
    if project.project != svc.project.project:
        return 409, {"error": f"the file is for project {project.project!r}, this core "
                              f"serves {svc.project.project!r}"}
    if (raw or {}).get("core") != svc.project.raw.get("core"):
        return 409, {"error": "the core section differs: restart the core service to change it"}
    if (project.routing is None) != (svc.project.routing is None):
        return 409, {"error": "adding or removing the routing section needs a restart"}
    try:
        rev = svc.apply(project, (body or {}).get("who", "zfast core apply"))
    except Exception as err:
        return 503, {"error": f"store: {err}"}
    svc.events.log("apply", revision=rev, source=(body or {}).get("source"))
    return 200, {"revision": rev}
