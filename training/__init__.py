"""avsearch training: HSC-MAE and baselines, evaluation and ONNX export.

Imports nothing of ours outside ``training``. Submodules that need torch import it themselves;
``training.data``, ``training.synthetic``, ``training.metrics`` and ``training.cca`` do not, so the
batch indexing jobs can reuse them without torch.
"""
