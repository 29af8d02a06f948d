"""``python -m stages <stage> ...``: the ``sae`` console script, for launchers that start a Python module."""

from stages.cli import main

main(prog_name="sae")
