"""``python -m spec_lightning fit --config ...``: the same as the ``spec-lightning`` command."""

from spec_lightning.cli import main

main()
