"""``sae report``: the summary report, and the one MLflow run of this pipeline execution.

The only process that writes to MLflow (README, "Experiment tracking and reports"): it reads every
stage's metrics file, so stages DVC skipped are in the run too, and queued experiments never write
concurrently.
If the tracker is unreachable the report is still written, one warning is logged and the run is
saved under ``.sae-cache/pending-runs/`` for ``sae sync``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pipeline.params import flatten, to_dict
from pipeline.paths import MODELS
from pipeline.report import build_document, gather, write_report
from pipeline.tracking import (
    RunPoint,
    TrackingUnavailable,
    build_record,
    log_record,
    probe,
    repo_root,
    resolve_tracking_uri,
    save_pending,
    search_points,
)
from pipeline.tracking.record import HEADLINE
from stages.common import Params, log, stage_command

REPORTS = Path("reports")


def _quiet_store_logs() -> None:
    # A fresh SQLite store runs its schema migrations and logs each at INFO; that is noise in a stage log.
    for name in ("alembic", "mlflow.store.db.utils", "mlflow.tracking.fluent"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _dictionary_hooks(hooks: list[str]) -> list[str]:
    """The hooks with a dictionary (``pipeline.pairs.saved_dictionaries``'s rule, from the cfg.json files alone):
    with a transcoder among them (kept under its mlp_in), the hooks without a directory (its mlp_out) are left out."""
    cfgs = {h: MODELS / h / "cfg.json" for h in hooks}
    found = {h: json.loads(c.read_text()) for h, c in cfgs.items() if c.is_file()}
    if not any(c.get("architecture") == "transcoder" for c in found.values()):
        return list(hooks)
    return [h for h in hooks if h in found]


@stage_command(help="Summary report (Markdown + HTML) of the pipeline's outputs, and the MLflow run of this execution.")
def command(params: Params) -> None:
    _quiet_store_logs()
    work = Path.cwd()  # the stage's workspace (a temp copy under `dvc exp run --queue`)
    root = repo_root()  # the real repository: store, artifacts and pending runs live here
    flat = flatten(to_dict(params))
    hooks = _dictionary_hooks(params.extract.hooks)
    tp = params.tracking

    record = build_record(work, flat, tp.experiment, hooks)
    inp = gather(work, flat, hooks, params.report.top_features)
    inp.run = {"run_name": record.run_name, "commit": record.tags.get("git.commit", ""),
               "dirty": record.tags.get("git.dirty", ""), "exp_name": record.tags.get("dvc.exp_name", ""),
               "baseline_rev": record.tags.get("dvc.baseline_rev", "")}

    uri = resolve_tracking_uri(tp.uri, root)
    problem: str | None = None
    points: list[RunPoint] = []
    if not tp.enabled:
        inp.tracking_note = "MLflow tracking disabled (tracking.enabled: false)."
    else:
        problem = probe(uri, tp.timeout_s)
        if problem is None and params.report.frontier:
            try:
                points = search_points(uri, tp.experiment, root, HEADLINE, max_runs=params.report.max_runs)
            except Exception as e:  # reading other runs is best-effort; the failure decides pending below
                problem = f"cannot read runs: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        inp.tracking_note = (f"MLflow: run '{record.run_name}' in experiment '{tp.experiment}' at {uri}."
                             if problem is None else
                             f"MLflow unreachable at report time ({problem}); run saved for `sae sync`.")
    current = {k: record.metrics[k] for k in HEADLINE if k in record.metrics}
    points.append(RunPoint(record.run_name, current, current=True))
    inp.frontier = points
    if not tp.enabled or not params.report.frontier:
        inp.frontier_note = "Only this run is shown (tracking or report.frontier disabled)."
    elif problem is not None:
        inp.frontier_note = "Only this run is shown: earlier runs could not be read from MLflow."
    else:
        inp.frontier_note = (f"{len(points) - 1} earlier finished run(s) with L0/FVU in experiment '{tp.experiment}'; "
                             "this run is the red star.")

    written = write_report(build_document(inp, params.report.top_features), work / REPORTS)
    log.info("report: %s", ", ".join(str(p.relative_to(work)) for p in written[:2]))
    record.artifacts += [[str(p), "report" if p.suffix != ".png" else "report/figures"] for p in written]

    if not tp.enabled:
        return
    if problem is None:
        try:
            run_id = log_record(record, uri, root)
            log.info("MLflow run %s (%s) logged to %s", record.run_name, run_id, uri)
            return
        except TrackingUnavailable as e:
            problem = str(e)
            # The report said where the run would be; say where it is instead (and ship that version).
            inp.tracking_note = f"MLflow refused the run ({problem}); run saved for `sae sync`."
            write_report(build_document(inp, params.report.top_features), work / REPORTS)
    bundle = save_pending(record, uri, root, problem)
    log.warning("MLflow tracking unavailable (%s); the run is saved in %s - upload it later with `sae sync`",
                problem, bundle)
