"""`python -m pretrain.cli ...`: the `pretrain` command."""

from pretrain.cli import main

main()
