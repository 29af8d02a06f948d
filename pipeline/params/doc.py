"""Render the params reference (docs/params.md) from the schema: ``python -m pipeline.params.doc``."""

from __future__ import annotations

import sys

from pipeline.params import Params, describe


def render() -> str:
    lines = ["# Params reference", "", "Generated from `pipeline/params/` by `python -m pipeline.params.doc`;",
             "a test keeps it in sync. Every key can be overridden with `--set key=value` or `dvc exp run -S key=value`.",
             "`params.yaml` must list every key (`null` counts): DVC tracks only the keys the file holds, so a missing",
             "key stops the stage with one line naming it instead of silently taking the default below.", ""]
    section = None
    for key, type_, default, help_ in describe(Params):
        head = key.split(".")[0] if "." in key else "(top level)"
        if head != section:
            section = head
            lines += ["", f"## {section}", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        lines.append(f"| `{key}` | {type_} | `{default!r}` | {help_.replace('|', '/')} |")
    return "\n".join(lines).replace("\n\n\n", "\n\n") + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
