"""twisted.web listeners (8080 downloads, 8443 HTTPS API): JSON routes, limits, client allow-list.

The pieces, smallest first:

- :mod:`.errors`: :class:`HttpError`, the one way a route answers an error;
- :mod:`.router`: :class:`Router`, a leaf resource mapping ``METHOD /path/{param}`` to a
  function and every answer (404, 405, 500 included) to JSON;
- :mod:`.request`: :class:`JsonSite`, a ``Site`` whose requests refuse large bodies before
  buffering them and ask the client policy before any route runs;
- :mod:`.allow`: :class:`ClientAllowList`, the CIDR/loopback/control-plane policy;
- :mod:`.listener`: :class:`WebListener`, the service that listens (or not, for a ``null``
  address) and closes its connections when it stops.
"""

from quantix.web.allow import ClientAllowList
from quantix.web.errors import HttpError
from quantix.web.listener import WebListener
from quantix.web.request import JsonSite
from quantix.web.router import Call, Router

__all__ = ["Call", "ClientAllowList", "HttpError", "JsonSite", "Router", "WebListener"]
