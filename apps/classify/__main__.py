"""``python -m medgemma_deploy.apps.classify -i IN -o OUT -m MODELS`` (MONAI Deploy conventions)."""

import sys

from medgemma_deploy.apps.classify.app import main

sys.exit(main())
