"""One module per CLI subcommand; each exposes a Typer-decorated function that ``cli.py`` registers."""
