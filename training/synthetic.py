"""The embedded default generator now lives in :mod:`avdata.synthetic`; this module re-exports it
so ``from training.synthetic import ...`` keeps working unchanged in the training code."""

from avdata.synthetic import *  # noqa: F401,F403
from avdata.synthetic import __all__  # noqa: F401
