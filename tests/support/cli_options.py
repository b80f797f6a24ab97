"""Test helper: the flags a ``medgemma-deploy`` subcommand accepts, read from the real parser."""

from medgemma_deploy.cli.main import build_parser


def cli_options(subcommand: str) -> set[str]:
    """Every option string (``-m``, ``--models`` …) of ``medgemma-deploy SUBCOMMAND``.

    Raises KeyError naming the subcommand when the CLI has no such subcommand, so a manifest that
    runs a command the CLI lacks fails its test.
    """
    choices = build_parser()._subparsers._group_actions[0].choices
    if subcommand not in choices:
        raise KeyError(f"medgemma-deploy has no subcommand {subcommand!r}; it has {sorted(choices)}")
    return set(choices[subcommand]._option_string_actions)
