"""``python -m medgemma_deploy.apps.listener``: the same as ``medgemma-deploy listen``."""

import sys

from medgemma_deploy.cli.listen import main

sys.exit(main())
