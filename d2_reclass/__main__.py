"""``python -m d2_reclass`` is the ``d2-reclass`` command line."""
import sys

from .cli import main

sys.exit(main())
