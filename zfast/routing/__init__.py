"""The routing service: HTTP/HTTPS balancers (HAProxy) with domain routing, TLS and ACME.

certs.py    certificates: self-signed, ACME (HTTP-01, stateless answers), renewal; kept in the store
haproxy/    one HAProxy: its files, its process (master-worker, hitless reload), its runtime API
router.py   the router daemon of one instance: the project's domains and certificates -> HAProxy
"""
