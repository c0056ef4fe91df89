"""``gist-ray mine``: positive-aware hard-negative mining with the guide's cached embeddings.

search.py (exact top-k: chunked torch or faiss), select.py (which candidates become negatives),
output.py (resumable parts, the atomic output file), command.py (the command itself).
"""
