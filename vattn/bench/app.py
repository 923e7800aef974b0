"""`vattn bench ...`: speed benchmarks. Subcommands register on `bench_app`."""
import typer

bench_app = typer.Typer(help="Speed benchmarks (ratios against a baseline measured in the same run).",
                        no_args_is_help=False)
