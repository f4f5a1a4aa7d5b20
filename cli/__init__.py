"""The `zoo` command: a thin Typer skin over zoo, training and export."""
