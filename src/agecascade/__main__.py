"""``python -m agecascade``: what ``torchrun -m agecascade train ...`` starts in each process."""
import sys

from agecascade.cli import main

sys.exit(main())
