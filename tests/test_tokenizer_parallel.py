"""Worker threads (``tokenizer.parallel.run_threads``, what ``tokenize --num_workers`` runs on): results in task
order, the first failure re-raised with its own type, and the other tasks stopped early."""

import threading
import time

import pytest

from tokenizer.parallel import run_threads


def test_results_come_back_in_task_order_from_several_threads():
    seen = set()

    def task(n, report):
        seen.add(threading.get_ident())
        time.sleep(0.01 * (5 - n % 5))  # later tasks finish first
        report(1)
        return n * n

    assert run_threads(task, list(range(12)), num_workers=3, total=12, progress=False) == [n * n for n in range(12)]
    assert len(seen) > 1 and threading.get_ident() not in seen
    assert run_threads(task, [3], num_workers=3, progress=False) == [9]  # one task: run here


def test_a_failure_is_re_raised_and_stops_the_other_tasks():
    reports = []

    def task(n, report):
        if n == 1:
            time.sleep(0.05)
            raise KeyError("task 1 failed")
        for _ in range(200):  # a long task: stops at its next report once task 1 has failed
            time.sleep(0.01)
            report(1)
            reports.append(n)
        return n

    start = time.perf_counter()
    with pytest.raises(KeyError, match="task 1 failed"):
        run_threads(task, list(range(6)), num_workers=2, progress=False)
    assert time.perf_counter() - start < 1.5  # not the 2 s a long task takes
    assert set(reports) <= {0, 2, 3}  # tasks not started by then never ran
