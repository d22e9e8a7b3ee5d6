"""``python -m rlcli`` and ``accelerate launch -m rlcli``."""

from rlcli.cli import main

main()
