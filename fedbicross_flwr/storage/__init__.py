"""Storage: safe checkpoint files (:mod:`.checkpoint_io`), the server's checkpoint of the
uploads (:mod:`.uploads_checkpoint`) and the clients' local-training cache
(:mod:`.client_cache`).
"""
