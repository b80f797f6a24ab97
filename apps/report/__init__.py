"""MedGemma draft reports as a MONAI Deploy application (see ``app.py`` and ``app.yaml``)."""
