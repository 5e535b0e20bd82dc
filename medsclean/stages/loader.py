"""The local executor of the features stage: a torch DataLoader decodes the images in worker
processes, this process encodes them (`medsclean.stages.encoding`).
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading

from medsclean.stages.encoding import EncodeJob, ImageFolderDataset, encode_batch, hash_error, strict_error


def _collate(batch):
    return batch


def encode_locally(job: EncodeJob, task) -> dict[int, str]:
    """Encode the images `job.todo` in batches of `cfg.batch_size`, decoded by `cfg.num_workers`
    loader processes, writing each image's entry as soon as its batch is done; `task` advances by
    one per image. Returns the errors of the unreadable ones, by index."""
    from torch.utils.data import DataLoader

    if not job.todo:
        return {}
    size = job.cfg.batch_size
    batches = [job.todo[b:b + size] for b in range(0, len(job.todo), size)]
    encoder = job.encoder
    loader = DataLoader(ImageFolderDataset(job.paths, encoder.preprocess), batch_sampler=batches,
                        num_workers=job.cfg.num_workers, collate_fn=_collate,
                        pin_memory=encoder.device.startswith("cuda"), persistent_workers=False,
                        worker_init_fn=functools.partial(init_worker, os.getpid()))
    errors: dict[int, str] = {}
    batches_iter = iter(loader)
    try:
        for batch in batches_iter:
            ok = []
            for i, pixels, err in batch:
                if err is None and job.hashes[i] is None:
                    err = hash_error(job.paths[i])
                if err is None:
                    ok.append((i, pixels))
                elif job.strict:
                    raise strict_error(err)
                else:
                    errors[i] = err
            if ok:
                encode_batch(encoder.get(), ok, [job.hashes[i] for i, _ in ok], job.cache)
            task.advance(len(batch))
    finally:
        stop_workers(batches_iter)
    return errors


# Loader workers. They are forked helpers of this process: they must neither outlive it (a kill -9
# of the main process left them blocked for good, holding the work folder's stage lock) nor take
# part in Ctrl-C (the terminal sends SIGINT to the whole process group; a worker interrupted between
# batches stalled in its exit, writing into a queue nobody read, and held up the main process's
# shutdown by 5 s per worker).

PR_SET_PDEATHSIG = 1
WORKER_STOP_GRACE_S = 1.0


def init_worker(parent_pid: int, worker_id: int) -> None:
    """`worker_init_fn` of the loader: ignore SIGINT (the main process handles Ctrl-C and stops the
    workers), and on Linux die with the parent (SIGKILL when it exits, however it exits)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        _die_with_parent(parent_pid)


def _die_with_parent(parent_pid: int) -> None:
    """prctl(PR_SET_PDEATHSIG, SIGKILL) for this process; then, should the parent already have died
    before the call (the signal only comes for a death after it), exit at once."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:
        os._exit(1)


def stop_workers(batches, grace_s: float = WORKER_STOP_GRACE_S) -> None:
    """Shut a DataLoader iterator's workers down now, rather than when the iterator is collected
    (which, after an exception, ran before the CLI's error line and took up to 5 s per worker).

    Workers finish the image in hand and exit; one still alive `grace_s` after it was told to stop
    (e.g. decoding a huge file) is terminated. A no-op for an iterator without workers or one that
    already finished.
    """
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is None or getattr(batches, "_shutdown", True):
        return
    workers = list(getattr(batches, "_workers", ()))
    told = getattr(batches, "_workers_done_event", None)
    finished = threading.Event()
    reaper = threading.Thread(target=_reap, args=(workers, told, finished, grace_s), daemon=True,
                              name="medsclean-loader-reaper")
    reaper.start()
    try:
        shutdown()
    finally:
        finished.set()
        reaper.join()


def _reap(workers: list, told, finished: threading.Event, grace_s: float) -> None:
    """Terminate the `workers` still alive `grace_s` after `told` is set (the loader sets it once
    its pin-memory thread has stopped, so no worker is killed while that thread reads), unless
    `finished` comes first."""
    while told is not None and not told.is_set():
        if finished.wait(0.02):
            return
    if finished.wait(grace_s):
        return
    for w in workers:
        w.terminate()  # a no-op for one already reaped
