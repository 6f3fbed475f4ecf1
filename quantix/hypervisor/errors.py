"""Translate ``libvirtError`` into domain errors, so callers never branch on libvirt codes."""

from __future__ import annotations

import libvirt

from quantix import errors

_UNAVAILABLE = {libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_RPC, libvirt.VIR_ERR_INVALID_CONN}
#: Socket-level failures count as "libvirt is down" only when they come from the RPC layer;
#: the same codes from storage or file code are ordinary failures.
_TRANSPORT_CODES = {libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_ERR_INTERNAL_ERROR}
_TRANSPORT_DOMAINS = {libvirt.VIR_FROM_RPC, libvirt.VIR_FROM_REMOTE}
_NOT_FOUND = {
    libvirt.VIR_ERR_NO_DOMAIN,
    libvirt.VIR_ERR_NO_STORAGE_POOL,
    libvirt.VIR_ERR_NO_STORAGE_VOL,
    libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT,
    libvirt.VIR_ERR_NO_NETWORK,
    libvirt.VIR_ERR_NO_SECRET,
}
_WRONG_STATE = {libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_ERR_OPERATION_DENIED}
#: OVERFLOW: a size the request made too large for libvirt (e.g. uint64-max bytes).
_INVALID = {
    libvirt.VIR_ERR_XML_ERROR,
    libvirt.VIR_ERR_INVALID_ARG,
    libvirt.VIR_ERR_CONFIG_UNSUPPORTED,
    libvirt.VIR_ERR_OVERFLOW,
}


def translate(exc: BaseException) -> errors.QuantixError | None:
    """The domain error for a ``libvirtError``; ``None`` for anything else."""
    if not isinstance(exc, libvirt.libvirtError):
        return None
    code = exc.get_error_code()
    message = exc.get_error_message() or str(exc)
    if code in _NOT_FOUND:
        return errors.NotFound(message)
    if code in _WRONG_STATE:
        return errors.WrongState(message)
    if code in _INVALID:
        return errors.Invalid(message)
    if code in _UNAVAILABLE or (code in _TRANSPORT_CODES and exc.get_error_domain() in _TRANSPORT_DOMAINS):
        return errors.HypervisorDown(message)
    if code == libvirt.VIR_ERR_OPERATION_TIMEOUT:
        return errors.Timeout(message)
    if code == libvirt.VIR_ERR_OPERATION_UNSUPPORTED or code == libvirt.VIR_ERR_NO_SUPPORT:
        return errors.Unsupported(message)
    return errors.QuantixError(f"libvirt: {message}")
