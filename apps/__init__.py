"""Runnable compositions of the operators: MONAI Deploy apps, each with its ``app.yaml``."""
