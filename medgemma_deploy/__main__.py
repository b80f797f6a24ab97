"""``python -m medgemma_deploy`` is the ``medgemma-deploy`` command."""

import sys

from medgemma_deploy.cli import main

sys.exit(main())
