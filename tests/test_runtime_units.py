"""Single-process units of the runtime that the multi-rank suites reach only on GPUs.

The NCCL backend's bounded wait for a collective (a peer that vanished mid-collective must give
TimeoutError, not a hang), the process-group timeout that leaves NCCL's watchdog behind it, the
placement tables the CUDA kernels scan, the device-side byte counts of traces, and when the kernels
of moe.cu serve a call.
"""
from __future__ import annotations

import datetime
import time
from types import SimpleNamespace

import pytest
import torch

from fuser_moe.backends import routing
from fuser_moe.backends.common import DeviceCount
from fuser_moe.backends.communicator import WATCHDOG_MARGIN_S, Communicator, pg_timeout_for
from fuser_moe.backends.cuda import MAX_KERNEL_TOP_K, MAX_KERNEL_WORLD, CudaBackend
from fuser_moe.executors.trace import TraceEvent


class _Work:
    """A stand-in for a torch.distributed Work: completes after `polls` polls (never, with None)."""

    def __init__(self, polls=None):
        self.polls, self.seen, self.waited = polls, 0, 0

    def is_completed(self) -> bool:
        self.seen += 1
        return self.polls is not None and self.seen > self.polls

    def wait(self) -> bool:
        self.waited += 1
        return True


def test_a_collective_that_never_completes_raises_timeout_error_and_aborts_the_group(monkeypatch):
    comm = Communicator(timeout_s=0.3)
    aborted = []
    monkeypatch.setattr(comm, "_abort_group", lambda: aborted.append(True))
    work = _Work(polls=None)
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"all_to_all_single: a peer did not answer within the timeout of 0\.3 s"):
        comm._wait_within_timeout(work, "all_to_all_single")
    waited = time.monotonic() - start
    assert 0.3 <= waited < 2.0, waited
    assert aborted == [True] and work.waited == 0


def test_a_collective_that_completes_is_waited_for_once():
    comm = Communicator(timeout_s=5.0)
    work = _Work(polls=3)
    comm._wait_within_timeout(work, "all_to_all_single")
    assert work.waited == 1 and work.seen == 4


def test_only_cuda_collectives_of_a_group_fuser_moe_owns_are_watched(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)  # CPU builds cannot ask
    owned = Communicator(timeout_s=1.0, owns_group=True)
    users = Communicator(timeout_s=1.0)
    cpu = torch.zeros(1)
    cuda = SimpleNamespace(is_cuda=True)  # what _watch_collectives asks of a tensor
    assert not owned._watch_collectives(cpu) and not users._watch_collectives(cpu)
    assert owned._watch_collectives(cuda) and not users._watch_collectives(cuda)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert not owned._watch_collectives(cuda)  # a collective being captured is not waited for


def test_the_group_timeout_leaves_nccl_watchdog_behind_fuser_moe_s_own():
    assert pg_timeout_for(torch.device("cpu"), 3.0) == datetime.timedelta(seconds=3.0)
    cuda = pg_timeout_for(torch.device("cuda", 0), 3.0)
    assert cuda >= datetime.timedelta(seconds=3.0 + WATCHDOG_MARGIN_S)


@pytest.mark.parametrize("seed", range(5))
def test_placement_orders_experts_by_rank_then_local_index(seed):
    gen = torch.Generator().manual_seed(seed)
    world, experts = 4, 23
    placement = [int(r) for r in torch.randint(0, world, (experts,), generator=gen)]
    p = routing.make_placement(experts, world, placement, torch.device("cpu"))
    order = p.expert_order.tolist()
    begin = p.rank_begin.tolist()
    assert sorted(order) == list(range(experts))
    assert begin[0] == 0 and begin[-1] == experts
    for d in range(world):
        run = order[begin[d]:begin[d + 1]]
        assert run == [e for e in range(experts) if placement[e] == d]  # local order: ascending id
        assert [p.local_index[e].item() for e in run] == list(range(len(run)))


def test_device_counts_are_read_when_a_trace_is_resolved():
    count = DeviceCount(torch.tensor(7), factor=3, offset=2)
    assert int(count) == 23
    event = TraceEvent(op="MoeDispatch", node="")
    event.bytes_sent, event.bytes_recv = count, DeviceCount(torch.tensor(0), 5)
    event.resolve_device_time()
    assert (event.bytes_sent, event.bytes_recv) == (23, 0)


def test_the_kernels_serve_cuda_tensors_within_their_limits():
    x = torch.zeros(2, 8)
    assert not CudaBackend._kernels_apply(x, 2, 2)  # CPU tensors: the shared-memory protocol
    if torch.cuda.is_available():
        xc = x.cuda()
        assert CudaBackend._kernels_apply(xc, MAX_KERNEL_TOP_K, MAX_KERNEL_WORLD)
        assert not CudaBackend._kernels_apply(xc, MAX_KERNEL_TOP_K + 1, 2)
        assert not CudaBackend._kernels_apply(xc, 2, MAX_KERNEL_WORLD + 1)
