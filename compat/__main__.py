import sys

from compat.gate import main

sys.exit(main())
