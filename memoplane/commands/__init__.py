"""CLI subcommand implementations: parse -> core call -> print."""
