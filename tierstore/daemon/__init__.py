"""tierstored: the per-host tierstore service (configuration, server, client protocol)."""
