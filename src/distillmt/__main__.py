"""`python -m distillmt` (and `accelerate launch -m distillmt run ...`): the command line."""

import sys

from distillmt.cli import main

sys.exit(main())
