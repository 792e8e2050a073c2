import sys

from PRLDetectorLib.cli.main import main

sys.exit(main())
