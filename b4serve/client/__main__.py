"""``python -m b4serve.client``: send many .npy images to the served model."""

import sys

from b4serve.client.http import main

sys.exit(main())
