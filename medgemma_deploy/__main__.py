"""``python -m medgemma_deploy`` is the ``medgemma-deploy`` command."""

import sys

from medgemma_deploy.cli.main import main

sys.exit(main())
