"""`vattn ...` commands. Library code logs; only this module prints."""
from __future__ import annotations

import typer

from vattn.bench.app import bench_app

app = typer.Typer(help="vattn: verified sparse attention for long-context decoding.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


def _load_bench_commands():
    # Each bench module registers its commands on bench_app when imported.
    import importlib
    for mod in ("vattn.bench.attention", "vattn.bench.cache"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


_load_bench_commands()


def main():
    app()


if __name__ == "__main__":
    main()
