"""libvirt backend: connection supervision, event loops, domain XML, lifecycle and storage."""
