"""`python -m kdfast ...` (what `accelerate launch -m kdfast ...` runs)."""
import sys

from kdfast.cli import main

sys.exit(main())
