"""`python -m avatarl`: the same command line as the `avatarl` script."""

import sys

from avatarl.cli import main

sys.exit(main())
