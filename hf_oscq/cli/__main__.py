"""`python -m hf_oscq.cli`: the same as the `hf-oscq` command."""

from . import main

raise SystemExit(main())
