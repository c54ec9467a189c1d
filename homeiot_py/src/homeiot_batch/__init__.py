"""The seed's batch entry points (``python -m homeiot_batch.run_archive`` / ``.dev_seed``)."""
