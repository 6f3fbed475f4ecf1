"""Command-line options of ``twistd quantix-node`` and the service they make."""

from __future__ import annotations

import os

from twisted.python import usage

from quantix import config as cfg

#: (flag, documented default, help). The parser default is None so that only given flags override.
_PARAMS = [
    ("listen", "0.0.0.0:9090", "gRPC listen address host:port"),
    ("config", cfg.DEFAULT_CONFIG_PATH, "YAML configuration file (used when present)"),
    ("libvirt-uri", "qemu:///system", "libvirt connection URI (test:///default for the test driver)"),
    ("control-plane", None, "control-plane base URL, e.g. http://cp:8080"),
    ("node-id", None, "node id (default: persisted in the state dir)"),
    ("state-dir", "/var/lib/quantix", "directory for persistent daemon state"),
    ("agent-socket-dir", "/var/run/quantix-kvm/vms", "directory of guest-agent sockets"),
    ("log-level", "info", "debug, info, warn or error"),
    ("metrics-listen", "0.0.0.0:9091", "Prometheus metrics address host:port, or off"),
]


class Options(usage.Options):
    optParameters = [
        [name, None, None, help + (f" [default: {default}]" if default else "")]
        for name, default, help in _PARAMS
    ]
    optFlags = [["register", None, "register with the control plane and send heartbeats"]]

    def opt_version(self) -> None:
        """Print the daemon's version, proto fingerprint and libvirt version, then exit."""
        from quantix import versions

        print(versions.text())
        raise SystemExit(0)

    def given(self) -> dict[str, object]:
        """The flags the user actually passed (never their defaults)."""
        out: dict[str, object] = {k: v for k, v in self.items() if k in cfg.FLAG_KEYS and v is not None}
        if not self["register"]:
            out.pop("register", None)
        else:
            out["register"] = True
        return out


def load_config(options: Options, environ: dict[str, str] | None = None, warnings: list[str] | None = None):
    path = options["config"] or cfg.DEFAULT_CONFIG_PATH
    return cfg.load(
        path,
        path_explicit=options["config"] is not None,
        environ=os.environ if environ is None else environ,
        flags=options.given(),
        warnings=warnings,
    )


def make_service(options: Options):
    """Build the service tree; configuration and contract errors exit with one line."""
    from twisted.logger import Logger

    warnings: list[str] = []
    try:
        config = load_config(options, warnings=warnings)
    except cfg.ConfigError as exc:
        raise SystemExit(f"quantix-node: {exc}") from None
    log = Logger(namespace="quantix")
    for warning in warnings:
        log.warn("{warning}", warning=warning)
    from quantix.ops import shutdown

    shutdown.install_fast_exit()  # before the heavy imports below (see its docstring)
    try:
        from quantix.node import NodeService
        from quantix.rpc.tls import TLSConfigError
    except Exception as exc:  # a stale or missing generated module, most likely
        raise SystemExit(f"quantix-node: {exc}") from None
    try:
        node = NodeService(config)
    except TLSConfigError as exc:
        raise SystemExit(f"quantix-node: {exc}") from None
    node.ops.configure_twistd(getattr(options, "parent", None))
    return node
