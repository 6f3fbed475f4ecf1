"""twistd plugin ``quantix-node``.

Import-light on purpose: twistd drops a plugin whose module fails to import without saying why,
so this module imports only Twisted/zope pieces and defers everything else to first use.
"""

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(IServiceMaker, IPlugin)
class QuantixNodeMaker:
    tapname = "quantix-node"
    description = "Quantix node daemon: gRPC node API over libvirt for the Quantix control plane."

    @property
    def options(self):
        from quantix.plugin import Options

        return Options

    def makeService(self, options):
        from quantix.plugin import make_service

        return make_service(options)


serviceMaker = QuantixNodeMaker()
