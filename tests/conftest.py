"""pytest configuration: the multi-rank harness, the backend parametrization and the cleanup checks."""
import multiprocessing.process
import os
import signal
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import harness  # noqa: E402


def cuda_backend_skip_reason(device: str):
    """Why the cuda backend cannot run in this test process, or None."""
    try:
        from fuser_moe.executors.backend_selection import cuda_backend_missing
    except ImportError as exc:  # pragma: no cover
        return f"cuda backend not importable: {exc}"
    missing = cuda_backend_missing(device)
    return None if missing is None else f"cuda backend skipped: {missing}"


@pytest.fixture(params=["nccl", "cuda"])
def backend(request):
    """Every backend; a missing one is skipped with the reason named, and so is nccl where a test's
    `world_size` ranks share one GPU (harness.nccl_skip_reason)."""
    if request.param == "cuda":
        reason = cuda_backend_skip_reason(harness.TEST_DEVICE)
        if reason:
            pytest.skip(reason)
    else:
        params = getattr(getattr(request.node, "callspec", None), "params", {})
        world_size = params.get("world_size")
        reason = harness.nccl_skip_reason(world_size) if isinstance(world_size, int) else None
        if reason:
            pytest.skip(reason)
    return request.param


@pytest.fixture(scope="session", autouse=True)
def _close_rank_pools():
    yield
    harness.close_pools()


# ---------------------------------------------------------------------------------------- cleanup checks
# Nothing the suite starts may outlive it, and no rank may leave a shared-memory segment behind, even
# when a test fails. Every process started through multiprocessing (the harness's pools, `spawn`,
# `run_ranks`) is recorded; every process the suite starts (subprocesses too) inherits a session token.
SESSION_TOKEN = f"FUSER_MOE_TEST_SESSION={os.getpid()}.{time.monotonic_ns()}"
os.environ["FUSER_MOE_TEST_SESSION"] = SESSION_TOKEN.split("=", 1)[1]
_started_pids: set = set()
_start_process = multiprocessing.process.BaseProcess.start


def _recording_start(self):
    _start_process(self)
    _started_pids.add(self.pid)


multiprocessing.process.BaseProcess.start = _recording_start


def session_processes() -> list:
    """Live processes that carry this session's token (started by the suite, at any depth), except this
    one and multiprocessing's resource tracker (which exits with this process)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if SESSION_TOKEN.encode() not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "resource_tracker" not in cmdline and harness.running(int(entry)):
            found.append((int(entry), cmdline.strip()))
    return found


def leftover_segments(pids) -> list:
    from fuser_moe.backends.transport.shm import segments_of

    return [name for pid in pids for name in segments_of(pid)]


@pytest.fixture(autouse=True)
def _no_segment_left_by_a_dead_rank():
    """After every test, passed or failed: no process it started and that has exited left a segment."""
    yield
    dead = [pid for pid in list(_started_pids) if not harness.running(pid)]
    names = leftover_segments(dead)
    if names:
        from fuser_moe.backends.transport.shm import release_segments_of

        for pid in dead:
            release_segments_of(pid)
        pytest.fail(f"exited ranks left shared-memory segments in /dev/shm: {names}", pytrace=False)


def pytest_sessionfinish(session, exitstatus):
    """The suite leaves no process and no segment behind; otherwise it fails (and cleans up)."""
    harness.close_pools()
    problems = []
    alive = [pid for pid in sorted(_started_pids) if harness.running(pid)]
    if alive:
        problems.append(f"rank processes still running: {alive}")
    orphans = [(pid, cmd) for pid, cmd in session_processes() if pid not in alive]
    if orphans:
        problems.append(f"processes started by the suite still running: {orphans}")
    for pid in alive + [pid for pid, _ in orphans]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    names = leftover_segments(sorted(_started_pids) + [os.getpid()])
    if names:
        from fuser_moe.backends.transport.shm import release_segments_of

        for pid in sorted(_started_pids) + [os.getpid()]:
            release_segments_of(pid)
        problems.append(f"shared-memory segments left in /dev/shm: {names}")
    if problems:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_sep("=", "fuser_moe cleanup check FAILED", red=True)
        for line in problems:
            (reporter.write_line if reporter else print)(line)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
