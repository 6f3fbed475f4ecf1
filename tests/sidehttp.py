"""A TLS client for the 8443 side API in tests: treq, trusting the daemon's own certificate."""

from __future__ import annotations

import json
from typing import Any

import treq
from twisted.internet import defer, reactor, ssl
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer


@implementer(IPolicyForHTTPS)
class _Named:
    def __init__(self, name: str, trust: Any, client: Any = None) -> None:
        self.name, self.trust, self.client = name, trust, client

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return ssl.optionsForClientTLS(self.name, trustRoot=self.trust, clientCertificate=self.client)


class SideClient:
    """``get``/``post`` fire with ``(status, body)``; ``body`` is the decoded JSON.

    The certificate is checked against the one the daemon generated (or was given), for the
    host the client dials, so a test passing here proves the SAN and the key match too.
    """

    def __init__(
        self,
        testcase: Any,
        cert_pem: bytes,
        host: str,
        port: int,
        server_name: str | None = None,
        client_pem: bytes | None = None,
    ) -> None:
        """``server_name``: dial ``host`` but check the certificate for that name;
        ``client_pem``: a client certificate and its key to present."""
        trust = ssl.Certificate.loadPEM(cert_pem)
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        policy: Any = BrowserLikePolicyForHTTPS(trustRoot=trust)
        if server_name is not None or client_pem is not None:
            client = ssl.PrivateCertificate.loadPEM(client_pem) if client_pem else None
            policy = _Named(server_name or host, trust, client)
        self.agent = Agent(reactor, contextFactory=policy, pool=self.pool)
        self.base = f"https://{host}:{port}"
        testcase.addCleanup(self.pool.closeCachedConnections)

    @defer.inlineCallbacks
    def request(
        self, method: str, path: str, body: Any = None, raw: bytes | None = None, headers: Any = None
    ):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        hdrs = {"Content-Type": ["application/json"]} if data is not None else {}
        hdrs.update(headers or {})
        resp = yield treq.request(method, self.base + path, data=data, headers=hdrs, agent=self.agent)
        text = yield resp.content()
        ctype = resp.headers.getRawHeaders("content-type", [""])[0]
        if not ctype.startswith("application/json"):
            raise AssertionError(f"{method} {path}: content type {ctype!r}: {text[:200]!r}")
        return resp.code, json.loads(text)

    def get(self, path: str, **kw: Any) -> defer.Deferred:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> defer.Deferred:
        return self.request("POST", path, body=body if body is not None else {}, **kw)
