import sys

from sdpo.cli import main

sys.exit(main())
