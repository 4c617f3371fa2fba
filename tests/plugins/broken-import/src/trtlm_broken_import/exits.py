"""An entry-point module that calls sys.exit() at import: it must not end the CLI."""
import sys

sys.exit(3)
