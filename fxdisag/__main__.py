import sys

from fxdisag.cli import main

sys.exit(main())
