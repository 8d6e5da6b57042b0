"""``bench models``, ``bench datasets``, ``bench methods``, ``bench formats``: what the registries hold."""

from __future__ import annotations

import click

from bench.cli.options import friendly_errors, no_match


@click.command()
@click.argument("pattern", default="*")
@friendly_errors
def models(pattern):
    """List the registered architectures (wildcards allowed: bench models 'resnet*')."""
    from bench.models import ARCHS

    names = ARCHS.list(pattern)
    if not names:
        no_match(ARCHS, pattern)
    for name, info in ARCHS.items():
        if name in names:
            click.echo(f"{name:<12} {info.description}")


@click.command()
def datasets():
    """List the registered datasets with their default protocol."""
    from bench.data import DATASETS

    for name, info in DATASETS.items():
        n = info.default_n or "all"
        click.echo(
            f"{name:<9} {info.num_classes:>3} classes  {'x'.join(map(str, info.input_shape)):<7} "
            f"eps {info.default_eps:<6} N={n:<6} {info.description}"
        )


@click.command()
@click.argument("pattern", default="*")
@friendly_errors
def methods(pattern):
    """List the pruning methods with their taxonomy (Piras et al. 2024) and native sparsity."""
    from methods.base import METHODS, get_method, list_methods

    keys = list_methods(pattern)
    if not keys:
        no_match(METHODS, pattern)
    for key in keys:
        card = get_method(key).card
        training = ", ".join(f"{k}: {v}" for k, v in card.training.items())
        click.echo(f"{key:<11} {card.display_name} — {card.paper_title} ({card.venue} {card.year}) {card.paper_url}")
        click.echo(
            f"{'':11} pipeline {card.pipeline} ({training}); structure {card.structure}; scope {card.scope}; "
            f"criterion {card.criterion}; losses {', '.join(card.losses)}"
        )
        click.echo(f"{'':11} native sparsity: {card.native_sparsity}")


@click.command()
def formats():
    """List the native checkpoint formats bench evaluate --checkpoint-format reads."""
    from bench.formats import FORMATS

    for name, fmt in FORMATS.items():
        click.echo(f"{name:<13} {fmt.description}")
