"""``python -m medgemma_deploy.apps.study -i IN -o OUT -m MODELS`` (MONAI Deploy conventions)."""

import sys

from medgemma_deploy.apps.study.app import main

sys.exit(main())
