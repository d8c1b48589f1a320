"""HTTP and HTTPS from a namespace, as a client of the router sees it: one request on a new
connection, the certificate a TLS listener serves for a name."""

from __future__ import annotations

import http.client
import json
import socket
import ssl

from cryptography import x509

from zfast.lab.netns import in_ns


class Response:
    def __init__(self, r: http.client.HTTPResponse):
        self.status, self.headers, self.body = r.status, r.headers, r.read()

    def json(self) -> dict:
        return json.loads(self.body)

    @property
    def name(self) -> str | None:
        """The backend that answered (None for an answer of HAProxy's own)."""
        try:
            return self.json().get("name")
        except ValueError:
            return None

    def sent_headers(self, key: str) -> list[str]:
        """Values of a request header as the backend received it (backends that echo them)."""
        return [v for k, v in self.json()["headers"] if k == key.lower()]


def tls_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE          # self-signed test certificates
    return ctx


def _connect(ns: str, addr: str, port: int, timeout: float) -> socket.socket:
    with in_ns(ns):
        return socket.create_connection((addr, port), timeout=timeout)


def get(ns: str, addr: str, host: str, path: str = "/", port: int = 80, tls: bool = False,
        sni: str | None = None, timeout: float = 3.0) -> Response:
    """One request on a new connection from namespace ns."""
    sock = _connect(ns, addr, port, timeout)
    if tls:
        sock = tls_context().wrap_socket(sock, server_hostname=sni or host)
    conn = http.client.HTTPConnection(addr, port, timeout=timeout)
    conn.sock = sock
    try:
        conn.request("GET", path, headers={"Host": host})
        return Response(conn.getresponse())
    finally:
        conn.close()


def served_cert(ns: str, addr: str, sni: str, port: int = 443) -> x509.Certificate:
    with tls_context().wrap_socket(_connect(ns, addr, port, 3.0), server_hostname=sni) as s:
        return x509.load_der_x509_certificate(s.getpeercert(binary_form=True))


def served_serial(ns: str, addr: str, sni: str, port: int = 443) -> str:
    """The served certificate's serial as CertManager writes it (hex, no leading zeros)."""
    return format(served_cert(ns, addr, sni, port).serial_number, "x")
