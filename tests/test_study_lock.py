"""One call per study dir (or per shard): two calls would ask the same cells for trials."""

from __future__ import annotations

from pathlib import Path

import pytest

from qexp.errors import QexpError
from qexp.study.lock import hold_study


def test_a_second_unsharded_call_is_refused_in_one_line(tmp_path: Path) -> None:
    with hold_study(tmp_path, None):
        with pytest.raises(QexpError) as err, hold_study(tmp_path, None):
            pass
        message = str(err.value)
        assert "\n" not in message and "is being run by pid" in message
        assert "an unsharded call" in message
    with hold_study(tmp_path, None):  # given back when the block ends
        pass


def test_shards_share_a_dir_but_not_with_an_unsharded_call(tmp_path: Path) -> None:
    with hold_study(tmp_path, (1, 2)), hold_study(tmp_path, (2, 2)):
        with pytest.raises(QexpError, match="shard 1-of-2|shard 2-of-2"), hold_study(
            tmp_path, None
        ):
            pass
        with pytest.raises(QexpError, match="shard 1-of-2"), hold_study(tmp_path, (1, 2)):
            pass
    with hold_study(tmp_path, None), pytest.raises(QexpError, match="an unsharded call"), (
        hold_study(tmp_path, (1, 2))
    ):
        pass


def test_a_dead_holders_lock_is_taken_over(tmp_path: Path) -> None:
    import json
    import os

    from qexp.rundir_lock import LOCK_NAME, machine_id

    folder = tmp_path / ".locks" / "all"
    folder.mkdir(parents=True)
    dead = {"token": "t", "pid": 2**22 + 12345, "host": "h", "machine": machine_id(),
            "pid_start": "1", "started_at": 0.0}  # fmt: skip
    (folder / LOCK_NAME).write_text(json.dumps(dead))
    assert not os.path.exists(f"/proc/{dead['pid']}")
    with hold_study(tmp_path, None):
        pass


def test_shards_of_another_k_overlap_and_are_refused(tmp_path: Path) -> None:
    with hold_study(tmp_path, (1, 2)), pytest.raises(QexpError, match="shard 1-of-2"), (
        hold_study(tmp_path, (1, 3))
    ):
        pass
