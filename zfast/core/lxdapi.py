"""LXD's REST API on its unix socket, with plain ``http.client``.

No client library: pylxd is on the pip index and in Debian (2.2.10 there), but a dozen calls
need none, and the unit tests check the exact requests (tests/fakes/lxd.py).
"""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path
from urllib.parse import quote

OP_TIMEOUT_S = 60


class LxdError(RuntimeError):
    def __init__(self, msg: str, code: int = 0):
        super().__init__(msg)
        self.code = code


class LxdUnreachable(LxdError, ConnectionError):
    """No daemon answers on any socket (an OSError too: callers that catch a refused
    connection catch it)."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("lxd", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock


class LxdClient:
    """LXD's REST API on its unix socket: JSON in and out, async operations waited for.

    Several sockets (one per member of a cluster on this machine): a request goes to the
    one that answered last, and to the next when it cannot connect (a lost member's socket
    refuses): nothing was sent then, so any request may go again."""

    def __init__(self, sockets: Path | str | tuple | list, timeout: float = 30.0):
        self.sockets = [str(p) for p in ((sockets,) if isinstance(sockets, (str, Path))
                                         else sockets)]
        self.socket_path = self.sockets[0]
        self.timeout = timeout

    def raw(self, method: str, path: str, body: dict | None = None,
            timeout: float | None = None) -> tuple[int, bytes]:
        order = [self.socket_path] + [p for p in self.sockets if p != self.socket_path]
        failed = []
        for sock in order:
            conn = _UnixConnection(sock, timeout or self.timeout)
            try:
                try:
                    conn.connect()
                except OSError as err:
                    failed.append(f"{sock}: {err.strerror or err}")
                    continue
                self.socket_path = sock
                data = json.dumps(body).encode() if body is not None else None
                headers = {"Content-Type": "application/json"} if data is not None else {}
                conn.request(method, path, body=data, headers=headers)
                resp = conn.getresponse()
                return resp.status, resp.read()
            finally:
                conn.close()
        raise LxdUnreachable(f"no LXD daemon answers ({'; '.join(failed)}): is lxd running?")

    def request(self, method: str, path: str, body: dict | None = None, wait: bool = True,
                timeout: float | None = None):
        status, data = self.raw(method, path, body, timeout)
        try:
            doc = json.loads(data or b"{}")
        except ValueError:
            raise LxdError(f"{method} {path}: HTTP {status}, not JSON", status) from None
        if doc.get("type") == "error" or status >= 400:
            raise LxdError(f"{method} {path}: {doc.get('error') or status}",
                           doc.get("error_code") or status)
        if doc.get("type") == "async":
            if not wait:
                return doc["metadata"]
            return self.wait(doc["operation"], int(timeout) if timeout else OP_TIMEOUT_S)
        return doc.get("metadata")

    def wait(self, operation: str, timeout: int = OP_TIMEOUT_S) -> dict:
        """The operation's end; raises when it failed. A clustered daemon's operation URLs
        carry ``?project=default``: ``/wait`` goes before that query (after it, the GET is
        of the operation itself, answered at once while it runs)."""
        path, _, query = operation.partition("?")
        op = self.request("GET", f"{path}/wait?timeout={timeout}" + (f"&{query}" if query else ""),
                          timeout=timeout + 5)
        if op.get("status_code") != 200:
            raise LxdError(f"{operation}: {op.get('err') or op.get('status')}",
                           op.get("status_code") or 0)
        return op

    def get(self, path: str):
        return self.request("GET", path)

    def put(self, path: str, body: dict):
        return self.request("PUT", path, body)

    def patch(self, path: str, body: dict):
        return self.request("PATCH", path, body)

    def post(self, path: str, body: dict):
        return self.request("POST", path, body)

    def delete(self, path: str):
        return self.request("DELETE", path)

    def exec(self, name: str, command: list[str], env: dict | None = None) -> tuple[int, str, str]:
        """Run a command in the instance to its end: (exit status, stdout, stderr)."""
        op = self.post(f"/1.0/instances/{quote(name)}/exec",
                       {"command": command, "environment": env or {}, "interactive": False,
                        "wait-for-websocket": False, "record-output": True})
        meta = op.get("metadata") or {}
        out = []
        for fd in ("1", "2"):
            log = (meta.get("output") or {}).get(fd)
            if not log:
                out.append("")
                continue
            status, data = self.raw("GET", log)
            out.append(data.decode(errors="replace") if status == 200 else "")
            try:
                self.raw("DELETE", log)
            except OSError:
                pass
        return int(meta.get("return", -1)), out[0], out[1]
