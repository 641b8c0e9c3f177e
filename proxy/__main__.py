"""`python -m proxy` is the `phiproxy` command."""

import sys

from proxy.cli import main

sys.exit(main())
