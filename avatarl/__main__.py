import sys

from avatarl.cli import main

sys.exit(main())
