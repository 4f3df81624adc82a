"""The data layer now lives in :mod:`avdata.features` (numpy only, no torch); this module re-exports
it so ``from training.data import ...`` keeps working unchanged in the training code."""

from avdata.features import *  # noqa: F401,F403
from avdata.features import __all__  # noqa: F401
