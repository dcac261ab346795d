import sys

from fuser_moe.cli import main

sys.exit(main())
