"""Start the Finetune Studio web app from a checkout (the same as `finetune-studio ui`).

    python app.py [--host 127.0.0.1] [--port 7860] [--auth user:pass] [--runs-dir DIR]

Binds 127.0.0.1 by default; any other address refuses to start without --auth.
"""

import sys

from studio.ui.server import main

if __name__ == "__main__":
    sys.exit(main())
