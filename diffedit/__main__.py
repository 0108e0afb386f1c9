"""`python -m diffedit` (what `accelerate launch -m diffedit batch ...` runs on every rank)."""

from diffedit.cli.main import main

main()
