"""The ``bench`` command line (click): the root group, which only wires the command modules below it.

Each command lives in its own module (:mod:`bench.cli.evaluate`, :mod:`bench.cli.results`, ...) and is imported
when it is run or its help is shown, never by another command; none imports this root. Shared options and error
handling are :mod:`bench.cli.options`.

Examples:
    bench evaluate                                     # the built-in digits track's dense model
    bench evaluate --checkpoint r18.pt --arch resnet18 --dataset cifar10 --n-samples 1000 --device cuda
    bench results --format csv
"""

from __future__ import annotations

import importlib

import click

# command name -> "module:attribute" (``bench --help`` lists them sorted).
COMMANDS = {
    "evaluate": "bench.cli.evaluate:evaluate",
    "prune": "bench.cli.prune:prune",
    "results": "bench.cli.results:results",
    "status": "bench.cli.results:status",
    "report": "bench.cli.report:report",
    "analyze": "bench.cli.analyze:analyze",
    "reported": "bench.cli.analyze:reported",
    "methods": "bench.cli.catalog:methods",
    "models": "bench.cli.catalog:models",
    "datasets": "bench.cli.catalog:datasets",
    "formats": "bench.cli.catalog:formats",
    "db": "bench.cli.db:db",
    "zoo": "bench.cli.zoo:zoo",
    "export": "bench.cli.zoo:export",
    "submit": "bench.cli.submit:submit",
    "leaderboard": "bench.cli.site:leaderboard",
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use: ``bench results`` never loads the evaluator."""

    def __init__(self, *args, lazy_commands: dict[str, str], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_commands = dict(lazy_commands)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.lazy_commands, *super().list_commands(ctx)})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.lazy_commands:
            return super().get_command(ctx, name)
        module_name, attribute = self.lazy_commands[name].split(":")
        command = getattr(importlib.import_module(module_name), attribute)
        if not isinstance(command, click.Command):
            raise TypeError(f"{self.lazy_commands[name]} is not a click command")
        return command


# Subcommands inherit these (click passes them down the contexts).
@click.group(
    cls=LazyGroup,
    lazy_commands=COMMANDS,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
)
@click.version_option(package_name="apbench")
def main() -> None:
    """apbench: every pruned model judged the same way, strongly, per sample."""
