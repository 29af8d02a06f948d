"""The ``sae`` console script: one subcommand per DVC stage, loaded lazily so ``sae --help`` is instant."""

from __future__ import annotations

import importlib
import sys

import click

from pipeline.numerics import portable_requested, request_reproducible_blas

# Before any stage module imports torch: MKL reads its reproducibility mode once, at its first call,
# and ATen its kernel set; so numerics.portable is read here, from the command line's params.
request_reproducible_blas(portable=portable_requested(sys.argv[1:]))

# name -> (module:attribute, one-line help). Order is the pipeline's order.
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("stages.prepare:command", "Corpus -> fixed-length token contexts (Parquet)."),
    "extract": ("stages.extract:command", "Token contexts -> activation datasets, one per hook."),
    "train": ("stages.train:command", "Activation datasets -> one trained SAE per hook."),
    "evaluate": ("stages.evaluate:command", "Reconstruction and spliced-model metrics of each SAE."),
    "interpret": ("stages.interpret:command", "Feature statistics, explanations, scores and dashboard."),
    "steer": ("stages.steer:command", "Causal steering evaluation against baselines."),
    "bench": ("stages.bench:command", "SAEBench-comparable evals: sparse probing, absorption, result files."),
    "report": ("stages.report:command", "Summary report (Markdown + HTML) and MLflow run."),
    "frontier": ("stages.frontier:command", "L0-FVU / L0-CE-recovered frontier across DVC experiments (PNG)."),
    "sync": ("stages.tracking_sync:command", "Upload MLflow runs saved while the tracker was unreachable."),
    "verify": ("stages.verify:command", "Rerun a commit's pipeline; compare with its recorded metrics (tolerances)."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        target, _ = COMMANDS[name]
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Short help from the table, without importing torch for every stage.
        with formatter.section("Commands"):
            formatter.write_dl([(name, help) for name, (_, help) in COMMANDS.items()])


@click.group(cls=LazyGroup, help="sae-pipeline: text -> activations -> SAEs -> features -> steering -> report.")
@click.version_option(package_name="sae-pipeline")
def main() -> None:
    pass
