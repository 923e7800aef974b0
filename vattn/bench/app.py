"""`vattn bench ...`: speed benchmarks. Subcommands register on `bench_app`."""
import typer

bench_app = typer.Typer(help="Speed benchmarks (ratios against a baseline measured in the same run).",
                        no_args_is_help=False)


def speed_vs(us: float, base_us: float) -> str:
    """A time against a baseline's, read one way only: "2.50x faster", "16.17x slower", "same"."""
    if us <= 0 or base_us <= 0:
        return "-"
    r = base_us / us
    if abs(r - 1) < 0.005:
        return "same"
    return f"{r:.2f}x faster" if r > 1 else f"{1 / r:.2f}x slower"
