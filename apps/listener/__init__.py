"""The DICOM listener app: ``python -m medgemma_deploy.apps.listener --spool DIR --destination …``.

An entry point, not an engine: it runs :class:`medgemma_deploy.listener.service.Listener` with the
options of ``medgemma-deploy listen`` (see :mod:`medgemma_deploy.cli.listen`).
"""
