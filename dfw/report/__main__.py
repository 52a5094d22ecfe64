"""`python -m dfw.report ...`"""

import sys

from .cli import main

sys.exit(main())
