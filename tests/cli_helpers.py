"""Shared helpers of the CLI tests: run ``lipbound`` in-process and read what it printed."""

from __future__ import annotations

import json

from lipbound.cli import main


def run_err(capsys, argv: list[str]) -> str:
    """Run the CLI in-process; it must fail with the one-line error (exit status 2)."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, f"exit status {rc}, stderr: {err}"
    assert err.startswith("lipbound: error:"), err
    return err


def run_json(capsys, argv: list[str]) -> dict:
    """Run the CLI in-process with ``--json``; it must succeed; the parsed output."""
    rc = main(argv + ["--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return json.loads(out)
