"""Small helpers every box shares: retry delays, atomic file replacement, per-key locks (pure)."""
