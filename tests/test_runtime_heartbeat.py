"""Heartbeats and blame: beat files read back, requeue leftovers, and who `rannc run` names.

The end-to-end cases (a SIGSTOPped, a killed, a stuck rank under `rannc run` and without it) are in
tests/test_runtime_launch.py; these check the parts on real files and threads.
"""

from __future__ import annotations

import signal
import time

from rannc_cli.runtime.heartbeat import DONE, Heartbeat, BeatWatch, beat_path
from rannc_cli.runtime.launcher import PEER_LOST, blame


def test_a_beating_rank_stays_young_and_a_silent_one_ages(tmp_path):
    beat = Heartbeat(tmp_path, rank=0, world=1, timeout=2.0).start()  # world 1: no peer to watch
    watch = BeatWatch(tmp_path, [0, 1])
    beat_path(tmp_path, 1).write_text("123 7\n")  # rank 1 beat once, then went silent
    time.sleep(0.1)
    watch.poll()
    time.sleep(1.0)
    ages = dict(watch.poll())
    assert watch.started(0) and watch.started(1)
    assert ages[0] < 0.6 < ages[1], ages  # rank 0 beats every 0.2 s
    beat.close()
    assert beat_path(tmp_path, 0).read_text().strip() == DONE
    assert 0 not in dict(watch.poll()) and 0 in watch.done and not watch.failed


def test_a_done_left_by_an_earlier_run_does_not_count(tmp_path):
    """A requeued job reuses its heartbeat folder: an old "done" is not this run's clean exit."""
    beat_path(tmp_path, 1).write_text(DONE + "\n")
    watch = BeatWatch(tmp_path, [1])
    time.sleep(0.3)
    ages = dict(watch.poll())
    assert 1 in ages and ages[1] >= 0.3 and not watch.started(1) and 1 not in watch.done
    beat_path(tmp_path, 1).write_text("99 1\n")
    beat_path(tmp_path, 1).write_text("failed ValueError: boom\n")
    watch.poll()
    assert watch.failed == {1: "ValueError: boom"}


def test_blame_prefers_a_rank_own_error_then_a_stopped_heartbeat_then_the_stuck_one():
    # rank 0 lost contact first, rank 1 then exited with its own error: rank 1
    assert blame([(0, PEER_LOST), (1, 1)], None, set(), {}, 60.0)[:2] == (1, 1)
    # killed by a signal
    rank, code, what = blame([(2, -signal.SIGKILL)], None, {0, 1}, {}, 60.0)
    assert (rank, code) == (2, 137) and "killed by SIGKILL" in what
    # a stopped heartbeat beats the survivors' lost-contact exits
    rank, code, what = blame([(0, PEER_LOST)], (1, 61.0), {1, 2}, {}, 60.0)
    assert (rank, code) == (1, PEER_LOST) and what.startswith("stopped answering first (no heartbeat for 61.0 s")
    # all lost contact, one still ran: the oldest heartbeat among those still running
    rank, _, what = blame([(0, PEER_LOST)], None, {1, 2}, {1: 0.5, 2: 3.0}, 60.0)
    assert rank == 2 and "while it still ran" in what
    # a rank stopped while exiting with its own exception
    assert blame([(0, PEER_LOST)], None, {1}, {}, 60.0, {1: "ValueError: boom"})[:2] == (1, 1)
    # nothing but lost contact: the first one
    assert blame([(1, PEER_LOST), (0, PEER_LOST)], None, set(), {}, 60.0)[:2] == (1, PEER_LOST)


def test_a_new_mtime_alone_is_a_beat(tmp_path):
    """On a full disk a rank can only touch its beat file: same content, newer mtime, still alive."""
    import os

    path = beat_path(tmp_path, 0)
    path.write_text("7 3\n")
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    watch = BeatWatch(tmp_path, [0])
    time.sleep(0.3)
    assert dict(watch.poll())[0] >= 0.3 and not watch.started(0)
    os.utime(path)  # what Heartbeat._write falls back to when the write fails
    assert dict(watch.poll())[0] < 0.1 and watch.started(0)
