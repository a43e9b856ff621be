"""Subcommands of the `kdfast` CLI: each module has add_arguments(parser) and main(args)."""
