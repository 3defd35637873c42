"""The one process-pool map: order, the serial path, and what happens after a failing job."""

import pytest

from medseg_jax.process_pool import map_in_processes


def _collect(iterator):
    results = []
    with pytest.raises(ValueError, match="invalid literal"):
        for result in iterator:
            results.append(result)
    return results


def test_results_come_in_job_order_in_both_paths():
    jobs = [(str(n),) for n in range(7)]
    assert list(map_in_processes(int, jobs, 1)) == list(range(7))
    assert list(map_in_processes(int, jobs, 2)) == list(range(7))
    assert list(map_in_processes(int, [], 2)) == []


def test_a_failure_stops_new_jobs_but_keeps_the_ones_in_flight():
    jobs = [("1",), ("x",), ("3",), ("4",), ("5",), ("6",), ("7",)]
    # serially nothing after the failing job runs
    assert _collect(map_in_processes(int, jobs, 1)) == [1]
    # with 2 workers at most 4 jobs are in flight: when the failing job's turn comes, jobs "x" to "5" are;
    # the others among them are still returned, "6" and "7" never start, then the failure is raised
    assert _collect(map_in_processes(int, jobs, 2)) == [1, 3, 4, 5]
