"""The cli room: the `stoker` command line.

- app.py       the entry point: parse, load configuration, dispatch
- args.py      the argument parser and its value types
- commands.py  one function per subcommand"""

from daemon.cli.app import main

__all__ = ["main"]
