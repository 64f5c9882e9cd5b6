"""The curvature room: operators over a dataset (``_operators``), estimators (``_estimators``) and
the ``torch.distributed`` reduction (``_distributed``). Public names live in :mod:`functx.curvature`."""
