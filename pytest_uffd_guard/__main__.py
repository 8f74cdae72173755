"""``python -m pytest_uffd_guard doctor [--json]``: what this machine offers."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pytest_uffd_guard",
        description="Tools of pytest-uffd-guard.",
    )
    # metavar: the list of commands shown names only the public ones.
    commands = parser.add_subparsers(dest="command", required=True, metavar="{doctor}")
    doctor = commands.add_parser(
        "doctor", help="show what this machine offers for guarded buffers, and why"
    )
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")
    doctor.add_argument("--no-e2e", action="store_true", help="skip the end-to-end write checks")
    # The doctor's end-to-end checks run in a child process through this
    # hidden command (issue 9, item 19: not listed by --help).
    commands.add_parser("_e2e")
    args = parser.parse_args(argv)

    if args.command == "_e2e":
        from .doctor_e2e import run_e2e_cases

        print(json.dumps(run_e2e_cases()))
        return 0

    from .doctor import diagnose, render

    report = diagnose(e2e=not args.no_e2e)
    sys.stdout.write(report.to_json() + "\n" if args.json else render(report))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
