"""Training recipes over tierstore tables: the `tierstore train` loop, metrics, plots."""
