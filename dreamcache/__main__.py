import sys

from dreamcache.cli import main

sys.exit(main())
