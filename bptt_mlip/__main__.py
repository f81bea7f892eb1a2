"""``python -m bptt_mlip``: the command line of :mod:`bptt_mlip.workflow.cli`."""

import sys

from bptt_mlip.workflow.cli import main

if __name__ == "__main__":
    sys.exit(main())
