"""``python -m ckptkit``: the same as the ``ckptkit`` console script."""

from ckptkit.cli.main import main

main()
