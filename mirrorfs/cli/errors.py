"""What every subcommand raises for a user's mistake, and the checks several of them share."""

from __future__ import annotations

import argparse


class CLIError(Exception):
    """A user-facing failure: printed as `mirrorfs: <message>` with exit code 1."""


def refuse_tls_psk(args: argparse.Namespace) -> None:
    if args.tls_psk is not None:
        from tap.server import TLS_PSK_UNSUPPORTED
        raise CLIError(f"--tls-psk: {TLS_PSK_UNSUPPORTED}")
