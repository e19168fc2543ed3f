"""``python -m fashionlabel``: the ``fashionlabel`` command, for an environment whose scripts folder is not on
PATH (or a checkout on PYTHONPATH that is not installed)."""

from fashionlabel.cli import main

main()
