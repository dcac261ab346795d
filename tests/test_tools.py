"""The pure parts of the GPU tools in tools/ (their GPU runs are in tools/gpu_check.sh)."""
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ll_stamps_skew_table_takes_medians_of_each_repetitions_differences():
    """Rank 1 starts 10 us after rank 0 in one repetition and 30 us in the other two, and its own
    dispatch takes 20 us and its combine 5 us (rank 0's: 50 and 10). The table gives the offsets from the
    earliest start of each repetition and the medians of each rank's own spans."""
    us = 1000
    rank0 = [(0, 50 * us, 60 * us, 70 * us)] * 3
    rank1 = [(10 * us, 30 * us, 40 * us, 45 * us), (30 * us, 50 * us, 60 * us, 65 * us),
             (30 * us, 50 * us, 60 * us, 65 * us)]
    rank2 = [(5 * us, None, None, None)] * 3  # a rank whose later points were not reached
    table = _tool("ll_stamps").skew_table([rank0, rank1, rank2]).splitlines()
    assert "dispatch own" in table[1] and "combine own" in table[1]
    cells = [line.split() for line in table[2:]]
    assert cells[0] == ["0", "0.00", "50.00", "60.00", "70.00", "50.00", "10.00"]
    assert cells[1] == ["1", "30.00", "50.00", "60.00", "65.00", "20.00", "5.00"]
    assert cells[2] == ["2", "5.00", "-", "-", "-", "-", "-"]
