import sys

from dnir.cli import main

sys.exit(main())
