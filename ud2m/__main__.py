"""``python -m ud2m train ...`` / ``python -m ud2m sample ...`` / ``python -m ud2m app ...``: the entry points without
the scripts."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    """Dispatch ``train``, ``sample`` and ``app`` (the rest of the words go to that command)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = ("train", "sample")
    if not argv or argv[0] not in (*commands, "app"):
        print(f"usage: python -m ud2m {{{','.join(commands)}}} [options]   (e.g. python -m ud2m sample --help)")
        print('       python -m ud2m app [options]   (the restoration web page; pip install -e ".[app]")')
        raise SystemExit(0 if argv[:1] in (["-h"], ["--help"]) else 2)
    command, rest = argv[0], argv[1:]
    if command == "train":
        from ud2m.cli.train import cli as train_cli

        sys.argv = [f"{sys.argv[0]} train", *rest]  # LightningCLI reads sys.argv itself
        train_cli()
        return
    if command == "app":
        from ud2m.app.page import main as app_main

        app_main(rest)
        return
    from ud2m.cli.sample import cli as sample_cli

    sample_cli(rest)


if __name__ == "__main__":
    main()
