"""`python -m ktchat.cli ARGS` is `ktchat ARGS`."""

import sys

from . import main

sys.exit(main())
