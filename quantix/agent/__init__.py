"""The guest agent channel: frame codec, per-connection protocol, per-VM connections, guest info."""
