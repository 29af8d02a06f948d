"""``sae sync``: upload the MLflow runs the report stage could not log (tracker down), then forget them.

Bundles live in ``.sae-cache/pending-runs/`` under the repository root (``$DVC_ROOT`` when set); each
is deleted only after its run is in the store, and a half-uploaded run from an interrupted sync is
replaced, never duplicated (runs are matched by their ``sae.record_id`` tag).
"""

from __future__ import annotations

import logging
import sys

import click

from pipeline.tracking import list_pending, repo_root, sync_pending
from stages.common import log, run_user_errors


@click.command(help="Upload MLflow runs saved while the tracking server was unreachable (.sae-cache/pending-runs/).")
@click.option("--uri", default=None, metavar="URI",
              help="Upload to this tracking URI instead of the one each run was meant for.")
@click.option("--list", "list_only", is_flag=True, help="Only list the pending runs.")
def command(uri: str | None, list_only: bool) -> None:
    def body() -> None:
        root = repo_root()
        pending = list_pending(root)
        if list_only or not pending:
            for p in pending:
                click.echo(f"{p.path.name}  {p.record.run_name}  -> {p.uri}")
            click.echo(f"{len(pending)} pending run(s) in {root / '.sae-cache' / 'pending-runs'}")
            return
        for name in ("alembic", "mlflow.store.db.utils"):  # schema-migration chatter of a fresh SQLite store
            logging.getLogger(name).setLevel(logging.WARNING)
        done, failed = sync_pending(root, uri)
        click.echo(f"uploaded {len(done)} run(s); {len(failed)} still pending")
        for line in failed:
            log.error("not uploaded: %s", line)
        if failed:
            sys.exit(1)

    run_user_errors(body)
