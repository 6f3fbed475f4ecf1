"""Domain events: libvirt callbacks mapped to NodeEvent, the event bus, reconciliation."""
