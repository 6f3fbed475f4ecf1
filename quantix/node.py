"""The composition root: every box of one daemon, wired together, started and stopped in order.

Read :meth:`NodeService.__init__` for which box depends on which. Each box is built from its
configuration and the facades (:mod:`quantix.facades`) of the boxes it uses; the handler
classes of the gRPC API get exactly the facades they use (:meth:`NodeService.rpc_handlers`).
No box reaches back into the node.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, NoReturn

import libvirt
from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.logger import Logger

from quantix import state
from quantix.agent import sockets
from quantix.agent.facade import WorkerAgents
from quantix.agent.manager import AgentManager
from quantix.agent.quiesce import Quiesce
from quantix.bridge import run_in_worker
from quantix.config import Config, ListenError
from quantix.errors import WrongState
from quantix.events import mapping
from quantix.events.bus import EventBus
from quantix.events.metrics import MetricsHub, stats_flags
from quantix.events.watcher import DomainWatcher
from quantix.hypervisor import hostinfo
from quantix.hypervisor.connection import Hypervisor
from quantix.hypervisor.migration_target import Tokens
from quantix.hypervisor.statuscache import DomainCache
from quantix.hypervisor.storage import StorageManager
from quantix.images.engine import DownloadEngine
from quantix.network.ovsdb import OvsdbClient
from quantix.network.ports import PortStore
from quantix.network.service import NetworkPorts
from quantix.ops.service import Operations
from quantix.ops.shutdown import stop_in_order
from quantix.rpc import registry, status, tls
from quantix.rpc.agent_rpcs import AgentRpcs
from quantix.rpc.event_rpcs import EventRpcs
from quantix.rpc.image_rpcs import ImageRpcs
from quantix.rpc.migration_rpcs import MigrationRpcs
from quantix.rpc.network_rpcs import NetworkRpcs
from quantix.rpc.node_rpcs import NodeRpcs
from quantix.rpc.server import SERVICE, GrpcServer
from quantix.rpc.storage_rpcs import StorageRpcs
from quantix.rpc.vm_rpcs import VmRpcs
from quantix.util.reactor import INodeReactor, running_reactor

if TYPE_CHECKING:
    from quantix.controlplane.images import ImageReporter
    from quantix.controlplane.link import ControlPlaneLink
    from quantix.ops.metrics import NodeCollector
    from quantix.web.listener import WebListener
    from quantix.web.sideapi import HttpsListener

log = Logger(namespace="quantix.node")


def _fatal(message: str) -> NoReturn:
    """Exit with one line on the real stderr: twistd would log an exception with a traceback,
    and by now it has redirected ``sys.stderr`` into the log."""
    print(f"quantix-node: {message}", file=sys.__stderr__, flush=True)
    raise SystemExit(1)


class ListenerOff(Service):
    """An 8080 or 8443 listener configured off (``listen: null``), in its place among the node's
    services: twisted.web and the routes are then never imported (idle memory, start-up time)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def startService(self) -> None:
        super().startService()
        log.info("{name} listener off", name=self.name)


class NodeService(MultiService):
    """Builds the boxes and wires them; the attributes are the boxes themselves.

    Children start in the order added and stop one at a time in reverse order
    (:mod:`quantix.ops.shutdown`): operations, libvirt, the download engine and its HTTP
    listener, gRPC, the event bus, the metrics hub, the domain watcher, the control-plane link.
    """

    def __init__(self, config: Config, reactor: INodeReactor | None = None) -> None:
        super().__init__()
        if reactor is None:
            reactor = running_reactor()
        self.config = config
        self.reactor = reactor
        self.host = hostinfo.HostBox(config.node.hostname or "", config.node.management_ip or "")
        hv = config.hypervisor
        self.hypervisor = Hypervisor(
            reactor, hv.uri, event_loop=hv.event_loop, keepalive=(hv.keepalive_interval, hv.keepalive_count)
        )
        self.storage = StorageManager(self.hypervisor.conn, config.storage)
        self.downloads = DownloadEngine(
            reactor,
            config.downloads,
            config.state_dir,
            config.storage.cloud_images,
            roots=self.storage.download_roots,
        )
        self.http: WebListener | ListenerOff = ListenerOff("http")
        if config.http.listen:
            from quantix.web import images as web_images

            self.http = web_images.listener(reactor, config.http.listen, self.downloads)
        ovs = config.ovs
        self.network = NetworkPorts(
            reactor,
            self.hypervisor.conn,
            OvsdbClient(reactor, ovs.db_socket, timeout=ovs.timeout),
            PortStore(config.state_dir),
            default_bridge=ovs.integration_bridge,
        )
        ev = config.events
        self.bus = EventBus(reactor, buffer_size=ev.buffer_size, subscriber_queue=ev.subscriber_queue)
        # StreamMetrics: one sampler per interval for all subscribers.
        self.metrics_hub = MetricsHub(self.hypervisor.conn, stats_flags(hv.uri))
        self.watcher = DomainWatcher(
            reactor, self.hypervisor, self.bus, reconcile_interval=ev.reconcile_interval
        )
        self.domain_cache = DomainCache(max_age=hv.status_max_age)
        self.agents = AgentManager(
            reactor,
            socket_dir=config.agent.socket_dir,
            telemetry_interval=config.agent.telemetry_interval,
            on_event=self._agent_event,
        )
        #: The one owner of guest filesystem freezes (RPCs and quiesced snapshots).
        self.quiesce = Quiesce(self.agents.request, reactor)
        self.https: HttpsListener | ListenerOff = ListenerOff("https")
        if config.https.listen:
            from quantix.web import sideapi

            self.https = sideapi.build(reactor, config, self.hypervisor.conn, self.agents, self.host)
        #: The control-plane link (``.registered``, ``.node_id``), when registering.
        self.cplink: ControlPlaneLink | None = None
        self.image_reports: ImageReporter | None = None
        if config.auto_register and config.control_plane_url:
            # Imported only when registering: the HTTP client stack is most of its weight.
            from quantix.controlplane import sources as cp_sources

            try:
                self.cplink = cp_sources.make_link(reactor, config, self.host, self.hypervisor, self.storage)
            except OSError as exc:
                _fatal(f"control_plane.ca_bundle {config.control_plane.ca_bundle}: {exc.strerror}")
            except ValueError as exc:
                _fatal(f"control plane {config.control_plane_url}: {exc}")
        elif config.auto_register:
            log.warn("--register given without a control-plane URL: not registering")
        rpc_observers = status.RpcObservers()
        self.grpc = GrpcServer(
            config.listen_address,
            lambda: self.ops.gate(registry.collect(self.rpc_handlers())),
            max_workers=config.server.unary_workers(),
            max_streams=config.server.max_streams,
            grace=config.server.grace_seconds,
            max_message_bytes=config.server.max_message_bytes,
            credentials=tls.server_credentials(config.server),
            extra_options=(("grpc.max_concurrent_streams", config.server.max_streams_per_connection),),
            observers=rpc_observers,
        )
        self.ops = Operations(reactor, config, self.grpc, self._collector, rpc_observers=rpc_observers)

        # First child: starts before gRPC, stops last (metrics and the access log see the drain).
        self.ops.setServiceParent(self)
        self.hypervisor.setServiceParent(self)
        # Download jobs, and the 8080 listener serving them: stopped after gRPC, jobs last.
        self.downloads.setServiceParent(self)
        self.http.setServiceParent(self)
        self.grpc.setServiceParent(self)
        self.hypervisor.listen(self._hypervisor_up, self._hypervisor_down)
        # Stopped before the gRPC server (reverse order), so streams end with UNAVAILABLE.
        self.bus.setServiceParent(self)
        # Stops (ending StreamMetrics with UNAVAILABLE) before the bus.
        self.metrics_hub.setServiceParent(self)
        self.watcher.setServiceParent(self)
        # The 8443 side API (https.listen null: off); it stops before gRPC and libvirt do.
        self.https.setServiceParent(self)
        # GetVMStatus's per-domain cache of what the XML says, dropped when libvirt says it
        # changed; its last status, dropped on every change of state.
        self.watcher.xml_listeners.append(self.domain_cache.forget)
        self.watcher.state_listeners.append(self.domain_cache.state_changed)
        # Agent channels follow the VMs: opened when one runs, closed when it stops.
        self.watcher.state_listeners.append(self._domain_state)
        #: Migration tokens handed out by PrepareMigration (kept across gRPC restarts).
        self.migration_tokens = Tokens()
        self.watcher.state_listeners.append(self._migrated_in)
        # Last child: it stops first, before the gRPC server and libvirt go away.
        if self.cplink is not None:
            self.cplink.setServiceParent(self)
            # Local images go to the control plane after each registration (stops first).
            self.image_reports = cp_sources.make_image_reporter(reactor, config, self.cplink)
            self.image_reports.setServiceParent(self)

    def rpc_handlers(self) -> list[object]:
        """One handler object per box, each given exactly the facades it uses."""
        agents = WorkerAgents(self.reactor, self.agents, self.quiesce)
        return [
            NodeRpcs(self.host, self.hypervisor),
            AgentRpcs(agents, self.hypervisor),
            StorageRpcs(self.storage),
            EventRpcs(self.bus, self.metrics_hub),
            VmRpcs(
                self.config,
                self.hypervisor,
                self.storage,
                agents,
                self.bus,
                self.host,
                bound_nics=self.network.store.sources_for,
                domain_cache=self.domain_cache,
            ),
            NetworkRpcs(self.network),
            MigrationRpcs(
                self.config,
                self.hypervisor,
                self.bus,
                self.migration_tokens,
                vm_changed=self.domain_cache.forget,
            ),
            ImageRpcs(self.downloads, self.reactor, self.bus.closed),
        ]

    def _collector(self) -> NodeCollector:
        """The Prometheus gauges, built (and prometheus_client imported) only when metrics are on."""
        from quantix.ops.metrics import NodeCollector

        return NodeCollector(self.host, self.hypervisor, self.bus, self.agents, self.cplink)

    @property
    def node_id(self) -> str:
        """The persisted node id, known once the service has started."""
        return self.host.node_id

    def startService(self) -> None:
        self.host.started_at = time.monotonic()
        if self.config.server.switch_interval_ms:
            sys.setswitchinterval(self.config.server.switch_interval_ms / 1000)
        try:
            self.host.node_id = state.node_id(self.config.state_dir, self.config.node.id)
        except OSError as exc:
            _fatal(f"state dir {self.config.state_dir}: {exc.strerror}")
        try:
            # QEMU binds agent sockets there: ours alone (0750, QEMU's group) before any VM runs.
            sockets.ensure_socket_dir(self.config.agent.socket_dir)
        except OSError as exc:
            _fatal(f"agent socket dir {self.config.agent.socket_dir}: {exc.strerror}")
        except WrongState as exc:
            _fatal(str(exc))
        try:
            super().startService()
        except (ListenError, OSError) as exc:
            _fatal(
                f"state dir {self.config.state_dir}: {exc.strerror}" if isinstance(exc, OSError) else str(exc)
            )
        self.ops.ready()

    def stopService(self):
        """Drain, then close (:mod:`quantix.ops.shutdown`): new calls get UNAVAILABLE; children
        stop one at a time, last added first; gRPC stops once the calls in flight are done (at
        most ``server.grace_seconds``), while libvirt is still up; agent channels close after it."""
        self.ops.stopping()
        return stop_in_order(
            self, before={self.grpc: self.ops.drain_calls}, after={self.grpc: self._after_grpc}
        )

    def _after_grpc(self) -> defer.Deferred[object]:
        self.network.ovsdb.close()
        return self.agents.stop_all()

    def setServiceParent(self, parent) -> None:
        super().setServiceParent(parent)
        self.ops.attach_logging(parent)

    def _agent_event(self, vm_id: str, kind: int, message: str) -> None:
        self.bus.publish(kind, vm_id, message)

    def _migrated_in(self, vm_id: str, name: str, state: str | None) -> None:
        """An offline arrival announced by ReceiveMigration: no libvirt event names it one."""
        if self.migration_tokens.arrived(vm_id, state):
            message = f"VM {name} migrated in (offline)"
            self.bus.publish(mapping.VM_MIGRATED_IN, vm_id, message, {"vm_name": name})

    def _domain_state(self, vm_id: str, name: str, state: str | None) -> None:
        if state == mapping.RUNNING:
            self.agents.vm_started(vm_id, domain_name=name)
            # Most VMs have no OVN port: no worker hop for them on every start or resume.
            if self.network.store.may_have_ports(vm_id):
                run_in_worker(self.network.vm_started, vm_id).addErrback(
                    lambda f: log.warn(
                        "binding the network ports of {vm_id}: {err}", vm_id=vm_id, err=f.value
                    )
                )
        elif state in (None, mapping.STOPPED, mapping.CRASHED):
            self.agents.vm_stopped(vm_id)
        if self.cplink is not None:
            # Best effort (today's control plane answers unimplemented; the heartbeat sync repairs).
            from quantix.controlplane import sources as cp_sources

            self.cplink.notify_vm_change(*cp_sources.vm_change(vm_id, name, state))

    def _hypervisor_up(self, conn: libvirt.virConnect) -> None:
        if self.grpc.server is not None:
            self.grpc.set_serving(SERVICE.full_name, True)
            # The control plane dials us as soon as it has our record: register only once the
            # gRPC server listens and libvirt answers (registration needs the host facts).
            if self.cplink is not None:
                self.cplink.start_registration()

    def _hypervisor_down(self) -> None:
        self.domain_cache.clear()  # events missed while away could have changed any domain
        if self.grpc.server is not None:
            self.grpc.set_serving(SERVICE.full_name, False)
