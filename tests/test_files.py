"""The one durable-write helper: whole files or none, no temporary file left behind, exclusive creation."""

from __future__ import annotations

import pytest

from assistant.files import TMP_SUFFIX, atomic_write_bytes, atomic_write_text, fsync_tree


def test_replace_create_exclusive_and_no_leftovers(tmp_path):
    path = tmp_path / "card.json"
    atomic_write_text(path, "first")
    atomic_write_bytes(path, b"second")
    assert path.read_bytes() == b"second"
    with pytest.raises(FileExistsError):
        atomic_write_text(path, "third", exclusive=True)
    assert path.read_text() == "second"
    atomic_write_text(tmp_path / "new", "made", exclusive=True)
    assert (tmp_path / "new").read_text() == "made"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["card.json", "new"]
    assert not list(tmp_path.glob(f"*{TMP_SUFFIX}"))


def test_a_failed_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "active"
    atomic_write_text(path, "v1\n")
    with pytest.raises(TypeError):
        atomic_write_bytes(path, "not bytes")   # fails while writing the temporary file
    assert path.read_text() == "v1\n" and [p.name for p in tmp_path.iterdir()] == ["active"]
    fsync_tree(tmp_path)
