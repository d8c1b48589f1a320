"""The node's control API: HTTP with JSON bodies on a unix socket in its state dir.

The daemon serves it (``Server``); the CLI and tests talk to it (``Client``).
Endpoints are described in docs/openapi.yaml; the core daemon serves its own routes
through the same Server, described in docs/openapi-core.yaml.
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import socket
import socketserver
import threading
from pathlib import Path
from typing import Callable

SOCKET_NAME = "api.sock"


class ApiError(Exception):
    """The node answered with an error, or could not be reached."""

    def __init__(self, message: str, status: int = 0, problems: list[str] | None = None):
        super().__init__(message)
        self.status = status
        self.problems = problems or []


Handler = Callable[[dict | None], tuple[int, object]]


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class Server:
    """Serves routes {("GET", "/status"): handler, ...}; a handler returns (status, body)."""

    def __init__(self, state_dir: Path, routes: dict[tuple[str, str], Handler]):
        self.path = Path(state_dir) / SOCKET_NAME
        routes_ = routes

        class RequestHandler(http.server.BaseHTTPRequestHandler):
            def _serve(self, method: str) -> None:
                route = routes_.get((method, self.path.split("?")[0]))
                if route is None:
                    return self._send(404, {"error": f"no such endpoint: {method} {self.path}"})
                body = None
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    try:
                        body = json.loads(self.rfile.read(length))
                    except ValueError:
                        return self._send(400, {"error": "body is not JSON"})
                try:
                    status, result = route(body)
                except Exception as err:  # the daemon stays up; the caller gets the reason
                    status, result = 500, {"error": f"{type(err).__name__}: {err}"}
                self._send(status, result)

            def _send(self, status: int, body: object) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # noqa: N802 (http.server's naming)
                self._serve("GET")

            def do_POST(self):  # noqa: N802
                self._serve("POST")

            def address_string(self):
                return "unix"

            def log_message(self, *args):
                pass

        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self.path.unlink()
        self.server = _UnixHTTPServer(str(self.path), RequestHandler)
        os.chmod(self.path, 0o600)
        self.thread = threading.Thread(target=self.server.serve_forever, name="api", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


class Client:
    def __init__(self, state_dir: str | Path, timeout: float = 30.0):
        self.path = Path(state_dir) / SOCKET_NAME
        self.timeout = timeout

    def request(self, method: str, endpoint: str, body: object = None) -> object:
        conn = _UnixConnection(str(self.path), self.timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if data else {}
            conn.request(method, endpoint, body=data, headers=headers)
            resp = conn.getresponse()
            payload = json.loads(resp.read() or b"null")
        except (FileNotFoundError, ConnectionRefusedError):
            raise ApiError(f"no zfast node is running with state dir {self.path.parent} "
                           f"(no socket at {self.path})") from None
        except (OSError, http.client.HTTPException) as err:  # a node that dies mid-answer
            raise ApiError(f"cannot talk to the node at {self.path}: {err}") from None
        finally:
            conn.close()
        if resp.status >= 400:
            problems = payload.get("problems", []) if isinstance(payload, dict) else []
            message = payload.get("error", str(payload)) if isinstance(payload, dict) else str(payload)
            raise ApiError(message, resp.status, problems)
        return payload

    def get(self, endpoint: str) -> object:
        return self.request("GET", endpoint)

    def post(self, endpoint: str, body: object) -> object:
        return self.request("POST", endpoint, body)
