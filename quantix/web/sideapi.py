"""The HTTPS side API on 8443: its listener, certificate, access policy and routes, assembled.

The control plane dials ``https://<management ip>:8443`` without verifying the certificate, so a
self-signed one is made when none is configured (:mod:`quantix.ops.selfsigned`). Who may call
what is :mod:`.access`; how each route is served is :mod:`.routes`.
"""

from __future__ import annotations

from collections.abc import Callable

import libvirt
from cryptography import x509
from OpenSSL import crypto
from twisted.internet import defer, ssl, task
from twisted.logger import Logger

from quantix import bridge
from quantix.agent.manager import AgentManager
from quantix.config import Config, ListenError
from quantix.hypervisor import hostinfo, qemuagent
from quantix.ops import selfsigned
from quantix.util.reactor import INodeReactor
from quantix.web.access import RouteAccess
from quantix.web.allow import ClientAllowList, resolve_host
from quantix.web.hostroutes import HostRoutes, identity
from quantix.web.listener import WebListener
from quantix.web.routes import Routes
from quantix.web.vmroutes import VmRoutes

log = Logger(namespace="quantix.web.sideapi")

RESOLVE_INTERVAL = 300.0


def _read(path: str, key: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise ListenError(f"https.{key} {path}: {exc.strerror}") from None


def tls_options(
    cert_pem: bytes, key_pem: bytes, client_ca_pem: bytes | None = None
) -> ssl.CertificateOptions:
    """Server TLS settings; with a client CA, a client certificate is asked for (and verified
    when sent) but not required at the handshake, so the open registration routes still work."""
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
        key = crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem)
        cas = x509.load_pem_x509_certificates(client_ca_pem) if client_ca_pem else []
    except (ValueError, crypto.Error) as exc:
        raise ListenError(f"https certificate or key unusable: {exc}") from None
    certificate = crypto.X509.from_cryptography(chain[0])
    extra = [crypto.X509.from_cryptography(c) for c in chain[1:]]
    if not cas:
        return ssl.CertificateOptions(privateKey=key, certificate=certificate, extraCertChain=extra)
    return ssl.CertificateOptions(
        privateKey=key,
        certificate=certificate,
        extraCertChain=extra,
        verify=True,
        requireCertificate=False,
        caCerts=[crypto.X509.from_cryptography(c) for c in cas],
    )


class HttpsListener(WebListener):
    """The 8443 listener: certificate (configured or self-signed) loaded at start, and the
    control plane's addresses re-resolved every :data:`RESOLVE_INTERVAL` seconds."""

    def __init__(
        self,
        reactor: INodeReactor,
        config: Config,
        routes: Routes,
        access: RouteAccess,
        cert_names: Callable[[], tuple[str, list[str]]],
    ) -> None:
        super().__init__(reactor, config.https.listen, routes.router(access, reactor), name="https")
        self.config = config
        self.access = access
        self.base_clients = access.clients
        self.cert_names = cert_names
        self._resolver: task.LoopingCall | None = None
        self.vm_routes: VmRoutes | None = None

    def startService(self) -> None:
        if self.listen is not None:
            self.tls = self._load_tls()
        super().startService()
        if self.listen is not None and self.config.control_plane_url:
            self._resolver = task.LoopingCall(self._resolve)
            self._resolver.clock = self.reactor
            self._resolver.start(RESOLVE_INTERVAL, now=True)

    def stopService(self) -> defer.Deferred[None]:
        if self._resolver is not None and self._resolver.running:
            self._resolver.stop()
        return super().stopService()

    def _load_tls(self) -> ssl.CertificateOptions:
        https = self.config.https
        if https.cert and https.key:
            cert, key = _read(https.cert, "cert"), _read(https.key, "key")
        else:
            hostname, ips = self.cert_names()
            try:
                paths = selfsigned.ensure(self.config.state_dir, hostname, ips)
            except OSError as exc:
                raise ListenError(
                    f"https: cannot write the certificate under {self.config.state_dir}: {exc.strerror}"
                ) from None
            if paths.generated:
                log.info(
                    "generated a self-signed certificate for {host} at {path}", host=hostname, path=paths.cert
                )
            cert, key = _read(paths.cert, "cert"), _read(paths.key, "key")
        ca = _read(https.client_ca, "client_ca") if https.client_ca else None
        return tls_options(cert, key, ca)

    def _resolve(self) -> defer.Deferred[None]:
        """Blocking DNS in a worker; a failed lookup keeps the previous addresses."""

        def resolved(addresses: list[str]) -> None:
            if addresses:
                self.access.clients = self.base_clients.with_addresses(addresses)

        d = bridge.run_in_worker(resolve_host, self.config.control_plane_url, reactor=self.reactor)
        d2 = d.addCallback(resolved)
        return d2.addErrback(lambda f: log.failure("resolving the control plane failed", f))


def access_for(config: Config) -> RouteAccess:
    https = config.https
    return RouteAccess(
        clients=ClientAllowList.from_cidrs(https.allowed_clients),
        open_read_only=https.open_read_only,
        token=https.token,
        require_client_cert=bool(https.client_ca),
    )


def build(
    reactor: INodeReactor,
    config: Config,
    conn: Callable[[], libvirt.virConnect],
    agents: AgentManager,
    host: hostinfo.HostBox,
    qga_runner: qemuagent.Runner | None = None,
) -> HttpsListener:
    """The 8443 listener: ``conn()`` is the live libvirt connection, ``agents`` the reactor-side
    :class:`~quantix.agent.manager.AgentManager`, ``host`` the host-facts box (hostname,
    management IP and facts, as registration and GetConsole use them)."""
    routes = Routes()
    vm = VmRoutes(conn, agents, config, qga_runner)
    vm.register(routes)
    HostRoutes(config, conn, host).register(routes)
    listener = HttpsListener(reactor, config, routes, access_for(config), lambda: _cert_names(host))
    listener.vm_routes = vm  # tests swap its QEMU guest agent runner
    return listener


def _cert_names(host: hostinfo.HostBox) -> tuple[str, list[str]]:
    hostname, ip = identity(host)
    return hostname, [ip]
