"""medgemma-deploy: MedSigLIP and MedGemma as MONAI Deploy operators with DICOM SR/SEG outputs.

The models are research foundations, not medical devices: every output this package writes says it
is AI-generated and unverified, and names the model and its version.
"""

from medgemma_deploy.errors import InputError, ModelLoadError, UsageError

__version__ = "0.1.0"

__all__ = ["InputError", "ModelLoadError", "UsageError", "__version__"]
