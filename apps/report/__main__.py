"""``python -m medgemma_deploy.apps.report -i IN -o OUT -m MODELS`` (MONAI Deploy conventions)."""

import sys

from medgemma_deploy.apps.report.app import main

sys.exit(main())
