"""A throw-away ACME server for end-to-end tests: pebble plus pebble-challtestsrv as its DNS.

    with Pebble(tmp_path, addr="127.0.0.1", netns=ns) as pebble:
        CertManager(store, "p", {"directory": pebble.directory, "ca_bundle": pebble.ca_bundle})
        ...
        open(root, "w").write(pebble.root_pem())    # to verify what pebble issued

pebble has no TLS certificate of its own in the Debian package: this makes a CA and a server
certificate for its listener (IP SAN 127.0.0.1, DNS localhost), ``.ca_bundle`` is that CA.
pebble-challtestsrv answers every A query with ``addr`` (and AAAA with ``addr6``, none by
default), so pebble validates HTTP-01 for any host name at ``addr:http_port``. Answering the
challenge there is the test's business (a stateless responder, HAProxy, ...): not done here.

Both processes run in network namespace ``netns`` (``ip netns exec``) or in the current one,
each in its own process group; ``close()`` kills both. Their output goes to
``<workdir>/pebble.log`` and ``<workdir>/challtestsrv.log`` (``.logs()`` returns both, handy in
an assertion message). pebble makes a new root CA at every start: ``root_pem()`` fetches it.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import signal
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from zfast.lab.netns import in_ns

# Deterministic and fast: no random sleeps in validation, no rejected nonces, no reused
# authorizations (every order is validated, so every issuance exercises HTTP-01).
DEFAULT_ENV = {"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0", "PEBBLE_AUTHZREUSE": "0"}


class PebbleError(RuntimeError):
    pass


def _need(binary: str) -> str:
    path = shutil.which(binary)
    if not path:
        raise PebbleError(f"{binary} not found: install the Debian package pebble "
                          "(scripts/bootstrap.sh does)")
    return path


def make_tls(workdir: Path, names: list[str]) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for ``names`` (IP addresses or DNS names).

    Returns (ca.pem, cert.pem, key.pem) under workdir."""
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=2)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "zfast test pebble listener CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))

    sans: list[x509.GeneralName] = []
    for n in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pebble")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))

    workdir.mkdir(parents=True, exist_ok=True)
    ca_path, cert_path, key_path = (workdir / "ca.pem", workdir / "cert.pem", workdir / "key.pem")
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return ca_path, cert_path, key_path


class Pebble:
    """pebble + pebble-challtestsrv, started at construction; a context manager."""

    def __init__(self, workdir: Path | str, addr: str = "127.0.0.1", netns: str | None = None, *,
                 addr6: str | None = None, listen: str = "127.0.0.1", port: int = 14000,
                 management_port: int = 15000, http_port: int = 80, tls_port: int = 5001,
                 dns_port: int = 8053, dns_management_port: int = 8055,
                 env: dict[str, str] | None = None, timeout: float = 15.0):
        """addr: where pebble's validation connects for every host name (HTTP-01 on http_port);
        netns: the network namespace to run in (None: the current one); env: extra/overriding
        environment for pebble (e.g. {"PEBBLE_AUTHZREUSE": "100"})."""
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.addr, self.addr6, self.netns, self.listen = addr, addr6, netns, listen
        self.port, self.management_port = port, management_port
        self.http_port, self.tls_port = http_port, tls_port
        host = f"[{listen}]" if ":" in listen else listen
        self.directory = f"https://{host}:{port}/dir"
        self.management = f"https://{host}:{management_port}"
        self._procs: list[subprocess.Popen] = []
        self._logs: list = []

        pebble, challtestsrv = _need("pebble"), _need("pebble-challtestsrv")
        names = sorted({listen, "127.0.0.1", "localhost"})
        ca, cert, key = make_tls(self.workdir / "tls", names)
        self.ca_bundle = str(ca)
        config = self.workdir / "pebble-config.json"
        config.write_text(json.dumps({"pebble": {
            "listenAddress": f"{host}:{port}",
            "managementListenAddress": f"{host}:{management_port}",
            "certificate": str(cert), "privateKey": str(key),
            "httpPort": http_port, "tlsPort": tls_port,
            "ocspResponderURL": "", "externalAccountBindingRequired": False,
        }}, indent=2))

        dns = f"127.0.0.1:{dns_port}"
        try:
            self._start("challtestsrv", [
                challtestsrv, "-defaultIPv4", addr, "-defaultIPv6", addr6 or "",
                "-dns01", dns, "-http01", "", "-https01", "", "-tlsalpn01", "",
                "-management", f"127.0.0.1:{dns_management_port}"], {})
            self._start("pebble", [pebble, "-config", str(config), "-dnsserver", dns],
                        {**DEFAULT_ENV, **(env or {})})
            self._wait(timeout)
        except BaseException:
            self.close()
            raise

    # -- processes

    def _start(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        log = open(self.workdir / f"{name}.log", "ab")
        self._logs.append(log)
        self._procs.append(subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, **env}, cwd=self.workdir, start_new_session=True))

    def _ssl(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca_bundle)

    def _get(self, url: str, timeout: float = 5.0) -> str:
        with in_ns(self.netns):
            with urllib.request.urlopen(url, context=self._ssl(), timeout=timeout) as r:
                return r.read().decode()

    def _wait(self, timeout: float) -> None:
        end, last = time.monotonic() + timeout, None
        while time.monotonic() < end:
            for p in self._procs:
                if p.poll() is not None:
                    raise PebbleError(f"{' '.join(map(str, p.args))} exited with "
                                      f"{p.returncode}\n{self.logs()}")
            try:
                json.loads(self._get(self.directory, timeout=2))
                return
            except (OSError, ValueError) as e:  # URLError is an OSError
                last = e
                time.sleep(0.1)
        raise PebbleError(f"pebble's directory {self.directory} did not answer in {timeout}s "
                          f"(last: {last})\n{self.logs()}")

    def logs(self) -> str:
        out = []
        for name in ("challtestsrv", "pebble"):
            path = self.workdir / f"{name}.log"
            if path.exists():
                out.append(f"--- {name}.log\n{path.read_text(errors='replace')[-4000:]}")
        return "\n".join(out)

    # -- what tests use

    def root_pem(self, intermediates: bool = True) -> str:
        """The root pebble issues under (``/roots/0``), by default followed by its
        intermediate (``/intermediates/0``): a CA file that verifies pebble's certificates."""
        pem = self._get(f"{self.management}/roots/0")
        if intermediates:
            pem = pem.rstrip("\n") + "\n" + self._get(f"{self.management}/intermediates/0")
        return pem.rstrip("\n") + "\n"

    def intermediate_pem(self) -> str:
        return self._get(f"{self.management}/intermediates/0")

    def close(self) -> None:
        """Kill both processes (their whole process groups). Idempotent."""
        for p in reversed(self._procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    p.kill()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self._procs.clear()
        for f in self._logs:
            f.close()
        self._logs.clear()

    def __enter__(self) -> "Pebble":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
