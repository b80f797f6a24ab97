"""CLI subcommands that live in their own modules.

Each module exposes ``register(subparsers)`` (adds its subparser, ``set_defaults(func=run)``) and
``run(args) -> int``; :mod:`medgemma_deploy.cli.main` wires them in.
"""
