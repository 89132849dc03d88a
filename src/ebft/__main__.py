import sys

from ebft.cli import main

sys.exit(main())
