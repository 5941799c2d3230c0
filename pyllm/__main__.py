"""`python -m pyllm <command>` is the same as `pyllm <command>`."""
import sys

from .cli import main

sys.exit(main())
