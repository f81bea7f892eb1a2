"""Progress reporting: batch counts match the batching, bar on a terminal, log lines otherwise."""

from __future__ import annotations

import io

import numpy as np

from bptt_mlip import progress
from bptt_mlip.data import batching, trajectory


def traj(n, t=3, i=0):
    rng = np.random.default_rng(i)
    pos = np.arange(n)[None, :, None] * np.array([2.5, 0, 0]) + rng.normal(0, 0.01, (t, n, 3))
    return trajectory.make_trajectory(np.full(n, 14), pos, forces=np.zeros_like(pos), traj_id=str(i))


def test_count_batches_matches_the_batching():
    trajs = [traj(n, i=i) for i, n in enumerate([5, 7, 30, 33, 40, 70, 3, 5, 5])]
    for bs in (1, 2, 4):
        got = sum(1 for _ in batching.relaxation_batches(trajs, bs))
        assert progress.count_batches([t.num_atoms for t in trajs], bs) == got
        frames = sum(1 for _ in batching.force_batches(trajs, bs))
        assert progress.count_batches([t.num_atoms for t in trajs for _ in range(t.num_frames)], bs) == frames


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_plain_lines_when_not_a_terminal_and_a_bar_on_one():
    out = io.StringIO()
    p = progress.Progress(4, "bptt epoch 1", stream=out, log_interval_s=3600)
    for _ in range(4):
        p.update(loss=1.5)
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2  # the first update, then the final one; nothing in between at a 1 h interval
    assert lines[-1].startswith("bptt epoch 1 4/4 [####################]") and "ETA 00:00" in lines[-1]
    assert "loss=1.5" in lines[-1]
    tty = FakeTTY()
    p = progress.Progress(2, "grid", stream=tty)
    p.update()
    p.update()
    p.close()
    assert tty.getvalue().startswith("\rgrid 1/2") and tty.getvalue().endswith("\n") and "it/s" in tty.getvalue()
