"""Tiny TCP and UDP servers that say who they are: the backends of the demo and the tests.

TCP: on connect, sends ``<name>\\n``, then echoes every line back.
UDP: answers each datagram with ``<name> <datagram>``.

    python -m zfast.lab.echo --name be1 --port 8080 [--udp-port 5353]
"""

from __future__ import annotations

import argparse
import socket
import socketserver
import threading


def serve(name: str, port: int, udp_port: int | None = None, host: str = "::") -> None:
    name_b = name.encode()

    class TCPHandler(socketserver.StreamRequestHandler):
        def handle(self):
            try:
                self.wfile.write(name_b + b"\n")
                for line in self.rfile:
                    self.wfile.write(line)
            except OSError:
                pass

    class UDPHandler(socketserver.DatagramRequestHandler):
        def handle(self):
            self.wfile.write(name_b + b" " + self.rfile.read())

    class TCPServer(socketserver.ThreadingTCPServer):
        address_family = socket.AF_INET6
        allow_reuse_address = True
        daemon_threads = True
        request_queue_size = 1024

        def server_bind(self):
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # v4 too
            super().server_bind()

    class UDPServer(socketserver.ThreadingUDPServer):
        address_family = socket.AF_INET6
        allow_reuse_address = True
        daemon_threads = True

        def server_bind(self):
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            super().server_bind()

    servers = [TCPServer((host, port), TCPHandler)]
    if udp_port:
        servers.append(UDPServer((host, udp_port), UDPHandler))
    for s in servers[1:]:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    print(f"{name}: listening on tcp/{port}" + (f" udp/{udp_port}" if udp_port else ""), flush=True)
    servers[0].serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True)
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--udp-port", type=int)
    args = ap.parse_args()
    serve(args.name, args.port, args.udp_port)


if __name__ == "__main__":
    main()
