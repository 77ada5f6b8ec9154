"""fusion.kept.write_kept: a kept file is written whole under a temporary name, or not at all."""

from __future__ import annotations

import os
import stat

from fusion.kept import write_kept


def test_a_kept_file_is_written_whole_with_the_usual_permissions(tmp_path):
    path = tmp_path / "kept" / "vectors.pt"
    previous = os.umask(0o022)
    try:
        write_kept(path, lambda file: file.write(b"vectors"))
    finally:
        os.umask(previous)
    assert path.read_bytes() == b"vectors"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # other users of a shared cache folder can read it
    assert [p.name for p in path.parent.iterdir()] == ["vectors.pt"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary_one(tmp_path):
    path = tmp_path / "splits.npz"
    path.write_bytes(b"old")

    def fail(file):
        file.write(b"half")
        raise RuntimeError("disk full")  # as torch.save reports a failed write

    write_kept(path, fail)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["splits.npz"]
