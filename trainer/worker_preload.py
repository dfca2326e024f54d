"""Imported by the loader workers' forkserver only (see ``trainer.workers.worker_context``).

It makes the heavy imports once in the server, so that each worker forks with them done
instead of paying seconds of imports, while the server stays a single-threaded process, as
anything that forks must: OpenBLAS would otherwise start its thread pool when numpy loads.
Workers take their creator's environment back (``trainer.workers.WorkerInit``) and run torch
with one thread anyway.
"""
import os

os.environ["OPENBLAS_NUM_THREADS"] = "1"
try:
    import torchvision  # noqa: F401 - the trainer's main module imports it in every worker

    import trainer.loader  # noqa: F401
except Exception:  # noqa: BLE001 - a failed preload must not kill the server: workers import it themselves
    pass
