import sys

from keyden.cli.main import main

sys.exit(main())
