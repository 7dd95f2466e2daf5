import sys

from star_export.cli import main

sys.exit(main())
