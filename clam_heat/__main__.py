"""``python -m clam_heat``: the ``clam-heat`` command."""

from .cli import main

main()
