"""Process faults, through the CLI in a subprocess (docs/reliability.md): `medsclean extract`
killed or interrupted, lists written to what a shell hands over (/dev/stdout, a FIFO, `>(...)`),
`runs --remove` while another command runs, and writes past the file-size limit.

The run is signalled once it has written its first image-cache entries, i.e. while its loader
workers are decoding. Ctrl-C is sent as a terminal sends it: SIGINT to the whole process group.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import stat
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; uses process groups")

N_IMAGES = 200
START_TIMEOUT_S = 60.0  # imports and the first batches, on a loaded CI machine
STOP_S = 2.0  # Ctrl-C: the `interrupted:` line, and the exit, within this long
EXIT_SLACK_S = 2.0  # interpreter teardown on a loaded machine (about 1 s idle, as after a successful run)
CHILDREN_GONE_S = 3.0  # kill -9: the workers die with the main process (at once with PR_SET_PDEATHSIG)
ENTRIES_BEFORE_SIGNAL = 4  # two batches: the workers are up and busy


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """200 noise PNGs (96×96, different content so that each is a cache entry of its own)."""
    root = tmp_path_factory.mktemp("fault-images")
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(root / f"{i:03d}.png")
    return root


def _command(images: Path, work: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "medsclean", "extract", str(images), "--work", str(work), "--num-workers", "2",
            "--resize", "64", "--crop", "64", "--batch-size", "2", *extra]


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "MEDSCLEAN_PROGRESS": "1"}  # the bar, as in a terminal


def _entries(work: Path) -> int:
    folder = work / "image-features"
    return sum(1 for _ in folder.rglob("*.safetensors")) if folder.is_dir() else 0


def _default_sigint() -> None:
    """Give the child the default SIGINT disposition: a test runner started in the background by a
    non-interactive shell inherits SIGINT ignored, and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(images: Path, work: Path) -> subprocess.Popen:
    """Start an extraction in a session of its own and return once it has written a few entries."""
    proc = subprocess.Popen(_command(images, work), env=_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=_default_sigint)
    deadline = time.monotonic() + START_TIMEOUT_S
    while _entries(work) < ENTRIES_BEFORE_SIGNAL:
        if proc.poll() is not None:
            pytest.fail(f"extract ended (exit {proc.returncode}) before it could be signalled:\n{proc.stderr.read()}")
        if time.monotonic() > deadline:
            _kill_group(proc)
            pytest.fail(f"extract wrote no image-cache entries within {START_TIMEOUT_S:.0f} s")
        time.sleep(0.02)
    return proc


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state first), None once the pid is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def _children(pid: int) -> dict[int, str]:
    """The processes whose parent is `pid`: pid → start time (to tell a reused pid apart)."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = _stat(int(stat.parent.name))
        if fields is not None and int(fields[1]) == pid:
            out[int(stat.parent.name)] = fields[19]
    return out


def _alive(pid: int, start_time: str) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[19] == start_time and fields[0] not in ("Z", "X")


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def test_kill_9_of_extract_takes_its_loader_workers_with_it(images, tmp_path):
    work = tmp_path / "work"
    proc = _start(images, work)
    children = _children(proc.pid)
    assert len(children) >= 2, f"expected the 2 loader workers as children, found {children}"
    try:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + CHILDREN_GONE_S
        while (left := [pid for pid, start in children.items() if _alive(pid, start)]) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not left, f"loader workers {left} outlived the killed extract (pid {proc.pid})"
    finally:
        for pid, start in children.items():
            if _alive(pid, start):
                os.kill(pid, signal.SIGKILL)
        proc.stderr.close()
    # nothing holds the stage lock any more: a rerun that refuses to wait for another run completes
    rerun = subprocess.run(_command(images, work, "--no-wait"), env=_env(), capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr


def test_ctrl_c_stops_extract_at_once_and_a_rerun_resumes(images, tmp_path):
    work = tmp_path / "work"
    proc = _start(images, work)
    watchdog = threading.Timer(120, _kill_group, (proc,))  # never hang the suite on a stuck worker
    watchdog.start()
    try:
        signalled = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C in a terminal: the main process and its workers
        said = None
        err = []
        for line in proc.stderr:  # ends when every holder of the pipe (main process, workers) is gone
            err.append(line)
            if said is None and line.startswith("interrupted:"):
                said = time.monotonic() - signalled
        code = proc.wait(timeout=30)
        stopped = time.monotonic() - signalled
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            _kill_group(proc)
    stderr = "".join(err)
    assert code == 130, stderr
    assert said is not None and "rerun the same command to resume" in stderr, stderr
    assert said <= STOP_S, f"the interrupted line came {said:.1f} s after Ctrl-C"
    assert "encoded images in image-features" in stderr and "checkpoint" not in stderr, stderr  # only what is there
    assert stopped <= STOP_S + EXIT_SLACK_S, f"extract took {stopped:.1f} s to stop after Ctrl-C"

    done = _entries(work)
    assert 0 < done < N_IMAGES
    rerun = subprocess.run(_command(images, work), env=_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    counts = re.search(r"extract: (\d+) of (\d+) images extracted, (\d+) reused from the image cache", rerun.stderr)
    assert counts, rerun.stderr
    assert tuple(map(int, counts.groups())) == (N_IMAGES - done, N_IMAGES, done)
    assert _entries(work) == N_IMAGES


class _Slow:
    """A dataset whose every item takes far longer than the loader's stop grace (a huge file)."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        time.sleep(60)
        return i


def test_a_worker_busy_with_one_image_is_stopped_after_the_grace_not_the_loaders_5_s():
    from torch.utils.data import DataLoader

    from medsclean.stages.loader import init_worker, stop_workers

    loader = DataLoader(_Slow(), batch_size=1, num_workers=1, worker_init_fn=partial(init_worker, os.getpid()))
    batches = iter(loader)
    worker = batches._workers[0]
    deadline = time.monotonic() + START_TIMEOUT_S
    while not worker.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.5)  # in __getitem__ by now (at worst still starting: stopped all the same)
    t0 = time.monotonic()
    stop_workers(batches, grace_s=0.5)
    took = time.monotonic() - t0
    worker.join(timeout=10)
    assert not worker.is_alive()
    assert took < 3.0, f"stopping a busy worker took {took:.1f} s"


MEMORY = ["--method", "memory", "--resize", "64", "--crop", "64", "--num-workers", "0", "--banks", "10", "-q"]


@pytest.fixture(scope="module")
def mvtec(tmp_path_factory) -> Path:
    from .helpers import make_mvtec

    return make_mvtec(tmp_path_factory.mktemp("fault-mvtec") / "data", n_train=8)


def _select(data: Path, work: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "medsclean", "select", str(data), "--work", str(work), *MEMORY, *extra]


def _run(command: list[str], **options) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300, **options)


def test_lists_reach_dev_stdout_a_fifo_a_descriptor_and_a_process_substitution(mvtec, tmp_path):
    work = tmp_path / "work"
    first = _run(_select(mvtec, work, "--out", str(tmp_path / "clean.txt"), "--rejected", str(tmp_path / "rej.txt")))
    assert first.returncode == 0, first.stderr
    clean, rejected = (tmp_path / "clean.txt").read_text(), (tmp_path / "rej.txt").read_text()
    assert clean and rejected

    to_stdout = _run(_select(mvtec, work, "--out", "/dev/stdout"))
    assert to_stdout.returncode == 0, to_stdout.stderr
    assert to_stdout.stdout == clean  # the list alone: the table went to stderr, as with --out -
    assert "medsclean select" in to_stdout.stderr

    fifo = tmp_path / "clean.fifo"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()), daemon=True)
    reader.start()
    read_end, write_end = os.pipe()
    with os.fdopen(read_end) as pipe:
        proc = subprocess.Popen(_select(mvtec, work, "--out", str(fifo), "--rejected", f"/dev/fd/{write_end}"),
                                env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                pass_fds=(write_end,))
        os.close(write_end)
        through_fd = pipe.read()  # to the end: the command has closed its copy
        err = proc.communicate(timeout=300)[1]
    reader.join(timeout=60)
    assert proc.returncode == 0, err
    assert received == [clean] and through_fd == rejected
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)

    counted = _run(["bash", "-c", " ".join(map(_quote, _select(mvtec, work))) + " --out >(wc -l) >/dev/null"])
    assert counted.returncode == 0, counted.stderr
    assert counted.stdout.strip() == str(len(clean.splitlines()))


def _quote(word: str) -> str:
    import shlex

    return shlex.quote(word)


def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def _leftovers(work: Path) -> list[Path]:
    """Temporary files and staging folders: what a failed write must not leave."""
    return [*work.rglob(".*.tmp-*"), *work.glob(".staging-*")]


def test_a_tensor_write_past_the_file_size_limit_is_one_line_and_leaves_nothing_half_written(mvtec, tmp_path):
    work = tmp_path / "work"
    proc = _run(_select(mvtec, work), preexec_fn=_limit_file_size(16 * 1024))  # an image's features are larger
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert re.fullmatch(rf"error: {re.escape(str(work))}/image-features/\w+/\w\w/\w+\.safetensors: File too large; "
                        r"the process's file-size limit \(`ulimit -f`\) or the file system's is lower; raise it or "
                        r"write to another disk", lines[0]), lines[0]
    assert not _leftovers(work) and not list(work.rglob("*.safetensors"))
    assert not (work / "extract").exists()


def test_a_text_write_past_the_file_size_limit_is_one_line_naming_the_file(mvtec, tmp_path):
    work = tmp_path / "work"
    assert _run(_select(mvtec, work)).returncode == 0
    record = next((work / "runs").glob("*.json"))
    before = record.read_bytes()
    assert len(before) > 1024
    proc = _run(_select(mvtec, work), preexec_fn=_limit_file_size(1024))  # every stage cached: the run record
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip() == f"error: {record}: File too large; the process's file-size limit (`ulimit -f`) " \
                                  f"or the file system's is lower; raise it or write to another disk"
    assert record.read_bytes() == before and not _leftovers(work)


def _wait_for(condition, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S * 2
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the command ended (exit {proc.returncode}) before {what}:\n{proc.stderr.read()}")
        if time.monotonic() > deadline:
            _kill_group(proc)
            pytest.fail(f"no {what} within {START_TIMEOUT_S * 2:.0f} s")
        time.sleep(0.05)


def _remove(work: Path, key: str):
    from typer.testing import CliRunner

    from medsclean.cli import app

    return CliRunner().invoke(app, ["runs", "--work", str(work), "--remove", key])


def test_runs_remove_refuses_what_a_running_command_reads_or_fills(mvtec, images, tmp_path):
    work = tmp_path / "work"
    made = _run(_select(mvtec, work, "--json"))
    assert made.returncode == 0, made.stderr
    summary = json.loads(made.stdout)
    key, features = summary["run"], Path(summary["stages"]["extract"]["path"])
    assert features.is_dir()

    # a select training on the same features: it holds them in use for as long as it runs
    trainer = subprocess.Popen(_select(mvtec, work, "--method", "meds", "--distill-iters", "100000", "--width", "16",
                                       "--depth", "2", "--heads", "2"),
                               env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        _wait_for(lambda: any((work / ".partial").glob("distill-*")), trainer, "training started")
        refused = _remove(work, key)
    finally:
        _kill_group(trainer)
        trainer.stderr.close()
    assert refused.exit_code == 1
    assert refused.output.strip() == f"error: {features}: in use by a running medsclean command; wait for it to " \
                                     f"end, then retry"
    assert features.is_dir() and (work / "runs").is_dir() and key in (next((work / "runs").glob("*.json")).read_text())

    # an extraction filling the image cache with entries no artifact refers to yet
    cached = _entries(work)
    extracting = subprocess.Popen(_command(images, work), env=_env(), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for(lambda: _entries(work) >= cached + ENTRIES_BEFORE_SIGNAL, extracting, "image-cache entries")
        refused = _remove(work, key)
    finally:
        _kill_group(extracting)
        extracting.stderr.close()
    assert refused.exit_code == 1
    assert re.fullmatch(rf"error: {re.escape(str(work))}/image-features/\w+: in use by a running medsclean command; "
                        r"wait for it to end, then retry", refused.output.strip()), refused.output
    assert features.is_dir()

    removed = _remove(work, key)  # nobody runs now
    assert removed.exit_code == 0, removed.output
    assert not features.exists() and not list((work / "image-features").rglob("*.safetensors"))
