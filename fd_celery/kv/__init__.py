"""KV-cache hand-off for splitwise: blobs in a store, small JSON references (:class:`KVRef`) that
travel through the result backend. Callers use this package's names only; which store holds a
blob is the reference's ``kind``."""

from fd_celery.kv.store import (
    MAX_KV_BYTES,
    SHM_DIR,
    SHM_PREFIX,
    STORES,
    KVRef,
    bytes_held,
    choose_store,
    close_pool,
    discard,
    note_held,
    note_taken,
    put,
    stores_offered,
    sweep_shm,
    take,
)

__all__ = ["KVRef", "put", "take", "discard", "note_held", "note_taken", "bytes_held", "stores_offered",
           "choose_store", "sweep_shm", "close_pool", "STORES", "SHM_DIR", "SHM_PREFIX", "MAX_KV_BYTES"]
