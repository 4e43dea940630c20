import sys

from mirrorfs.cli.main import main

sys.exit(main())
