import sys

from PRLDetectorLib.cli import main

sys.exit(main())
