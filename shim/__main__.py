"""``python -m shim``: the same entry point as the containerd-shim-pyrunc-v2 console script."""

from shim.cli import main

raise SystemExit(main())
