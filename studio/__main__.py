"""`python -m studio ...` is `finetune-studio ...`, e.g. `python -m studio ui --port 7861`."""

import sys

from studio.cli import main

sys.exit(main())
