"""avsearch service: a thin FastAPI layer over ``index`` (embedder + FAISS). Never imports torch."""
