"""``medistill models``: the model zoo and the feature taps of a model."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

models_app = typer.Typer(help="Inspect the model zoo and feature taps.", no_args_is_help=True)


@models_app.command("list")
def models_list(pattern: str = typer.Argument("*", help="glob, e.g. 'resnet*'")) -> None:
    """List model names (timm + cnn5)."""
    import timm

    for n in timm.list_models(pattern):     # cnn5 included: it is registered with timm
        print(n)


@models_app.command("taps")
def models_taps(name: str, input_size: int = typer.Option(224, "--input-size"), in_chans: int = typer.Option(3, "--in-chans"),
                num_classes: int = typer.Option(5, "--num-classes"), depth: int = typer.Option(2, "--depth"),
                small_input: str = typer.Option("auto", "--small-input")) -> None:
    """List tap names of a model with their output shapes."""
    from medistill.models import create_model, list_taps

    m = create_model(name, num_classes, in_chans, input_size, small_input=small_input)
    t = Table("tap", "shape")
    for n, s in list_taps(m, input_size, in_chans, depth):
        t.add_row(n, "×".join(map(str, s[1:])))
    Console().print(t)
    if getattr(m, "medistill_adaptation", None):
        Console().print(f"small-input adaptation: {m.medistill_adaptation}")
