"""files.write_dir_atomic: a directory replaced whole, or not at all."""
from __future__ import annotations

import pytest

from npas_serve.files import write_atomic, write_dir_atomic


def test_a_directory_is_replaced_whole_and_keeps_the_files_it_does_not_write(tmp_path):
    target = tmp_path / "ckpt"
    write_dir_atomic(target, lambda d: write_atomic(d / "a", lambda t: open(t, "w").write("1")))
    (target / "report.json").write_text("kept")
    write_dir_atomic(target, lambda d: write_atomic(d / "a", lambda t: open(t, "w").write("2")))
    assert (target / "a").read_text() == "2" and (target / "report.json").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]       # nothing left beside it


def test_a_failed_fill_leaves_the_old_directory_untouched(tmp_path):
    target = tmp_path / "ckpt"
    write_dir_atomic(target, lambda d: (d / "a").write_text("old"))

    def fail(d):
        write_atomic(d / "a", lambda t: open(t, "w").write("half"))
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_dir_atomic(target, fail)
    assert (target / "a").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
