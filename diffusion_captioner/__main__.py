"""``python -m diffusion_captioner`` is ``dcap``."""

import sys

from diffusion_captioner.cli import main

sys.exit(main())
