"""The client side of tierstore: a connection to ``tierstored`` (or an embedded store behind the
same API) and the PyTorch modules on top of it."""
