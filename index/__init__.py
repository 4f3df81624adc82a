"""avsearch index: the ONNX embedder (the one feature→embedding path), FAISS indexes, batch jobs.

Never imports torch: it reads the exported model directory (ONNX files + manifest.json).
"""
