"""A fake LXD REST server on a unix socket: it records every request and answers the few
LXD calls the runtime makes, sync or async as LXD does."""

from __future__ import annotations

import json
import socketserver
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path


class FakeLxd:
    def __init__(self, socket_path: Path):
        self.path = Path(socket_path)
        self.requests: list[tuple[str, str, dict | None]] = []
        self.instances: dict[str, dict] = {}
        self.exec_results: list[tuple[int, str, str]] = []   # what the next execs return
        self.state = {"pid": 0, "cpu": {"usage": 0}, "memory": {"usage": 0},
                      "network": {}}
        self.fail_ops: set[str] = set()     # paths whose operation fails
        self.on_exec = None                  # called with each exec's command (what it "does")
        self.members: dict[str, str] = {}    # a cluster's members: their status (none: no cluster)
        self.member_urls: dict[str, str] = {}   # their API addresses, where given
        self.pools = {"default"}
        self.images: dict[str, str] = {"zfast-img": "f1n6erpr1nt"}    # alias: fingerprint
        self._ops: dict[str, dict] = {}
        self._logs: dict[str, bytes] = {}
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _body(self):
                n = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(n)) if n else None

            def _send(self, status: int, payload):
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self):
                body = self._body()
                fake.requests.append((self.command, self.path, body))
                status, payload = fake.answer(self.command, self.path, body)
                self._send(status, payload)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True

        self.server = Server(str(self.path), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    # ---- answers ----------------------------------------------------------------------------

    @staticmethod
    def sync(metadata, status=200):
        return status, {"type": "sync", "status": "Success", "status_code": 200,
                        "metadata": metadata}

    @staticmethod
    def error(msg, code):
        return code, {"type": "error", "error": msg, "error_code": code}

    def async_op(self, path: str, metadata=None):
        op = f"/1.0/operations/op{len(self._ops)}"
        ok = path not in self.fail_ops
        self._ops[op] = {"id": op, "status": "Success" if ok else "Failure",
                         "status_code": 200 if ok else 400, "err": "" if ok else "it failed",
                         "metadata": metadata}
        # a clustered LXD's operation URLs carry the project, as a query
        return 202, {"type": "async", "status": "Operation created", "status_code": 100,
                     "operation": f"{op}?project=default", "metadata": self._ops[op]}

    def answer(self, method: str, path: str, body):
        base, _, query = path.partition("?")
        if base == "/1.0":
            return self.sync({"config": {}, "environment": {"server_clustered": bool(self.members)}})
        if base == "/1.0/cluster":
            return self.sync({"enabled": bool(self.members)})
        if base == "/1.0/cluster/members":
            return self.sync([{"server_name": n, "status": st, "url": self.member_urls.get(n, "")}
                              for n, st in self.members.items()])
        if base.startswith("/1.0/storage-pools/"):
            if base.rsplit("/", 1)[1] in self.pools:
                return self.sync({"name": base.rsplit("/", 1)[1]})
            return self.error("Storage pool not found", 404)
        if base.startswith("/1.0/images/aliases/"):
            alias = base.rsplit("/", 1)[1]
            if alias in self.images:
                return self.sync({"name": alias, "target": self.images[alias]})
            return self.error("Image alias not found", 404)
        if base.startswith("/1.0/images/") and method == "DELETE":
            fp = base.rsplit("/", 1)[1]
            self.images = {a: f for a, f in self.images.items() if f != fp}
            return self.async_op(base)
        if base == "/1.0/instances" and method == "GET":
            return self.sync(list(self.instances.values()) if "recursion=1" in query
                             else [f"/1.0/instances/{n}" for n in self.instances])
        if base.startswith("/1.0/operations/") and base.endswith("/wait"):
            return self.sync(self._ops[base[: -len("/wait")]])
        if base in self._logs:
            if method == "DELETE":
                del self._logs[base]
                return self.sync({})
            return 200, self._logs[base]
        if base == "/1.0/instances" and method == "POST":
            target = query.partition("target=")[2] if "target=" in query else ""
            self.instances[body["name"]] = dict(body, location=target or "none")
            return self.async_op(base)
        parts = base.split("/")
        if len(parts) >= 4 and parts[2] == "instances":
            name = parts[3]
            if name not in self.instances:
                return self.error("Instance not found", 404)
            inst = self.instances[name]
            if self.members.get(inst["location"], "Online") != "Online":
                return self.error(f"Member {inst['location']} is offline", 503)
            rest = parts[4:]
            if not rest:
                if method == "GET":
                    return self.sync(inst)
                if method == "PATCH":
                    inst.setdefault("config", {}).update(body.get("config", {}))
                    return self.sync({})
                if method == "DELETE":
                    del self.instances[name]
                    return self.async_op(base)
            if rest == ["state"]:
                if method == "GET":
                    return self.sync(self.state)
                return self.async_op(base)
            if rest == ["exec"]:
                if self.on_exec is not None:
                    self.on_exec(body["command"])
                rc, out, err = self.exec_results.pop(0) if self.exec_results else (0, "", "")
                n = len(self._logs)
                logs = {"1": f"/1.0/instances/{name}/logs/exec_{n}.stdout",
                        "2": f"/1.0/instances/{name}/logs/exec_{n}.stderr"}
                self._logs[logs["1"]], self._logs[logs["2"]] = out.encode(), err.encode()
                return self.async_op(base, {"return": rc, "output": logs})
        return self.error("not found", 404)

    # ---- what tests look at -----------------------------------------------------------------

    def calls(self, method: str | None = None, prefix: str = "") -> list[tuple[str, str, dict | None]]:
        return [r for r in self.requests
                if (method is None or r[0] == method) and r[1].startswith(prefix)
                and not r[1].startswith("/1.0/operations/") and "/logs/" not in r[1]]

    def execs(self) -> list[list[str]]:
        return [body["command"] for m, p, body in self.calls("POST") if p.endswith("/exec")]
