"""libvirt side of the daemon: event loops, connection supervision, domain XML and lifecycle."""
