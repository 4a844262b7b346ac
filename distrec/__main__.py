import sys

from distrec.cli import main

sys.exit(main())
