"""OUT is only ever written where nothing of the user's can be lost."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainmedic.demo.outdir import MARKER, OutDirError, prepare


def test_new_and_empty_directories_are_used_and_marked(tmp_path: Path) -> None:
    new = tmp_path / "a" / "demo-out"
    prepare(new)
    assert (new / MARKER).is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    prepare(empty)
    assert [p.name for p in empty.iterdir()] == [MARKER]


def test_a_previous_demo_is_replaced_but_files_added_beside_it_are_kept(tmp_path: Path) -> None:
    prepare(tmp_path)
    (tmp_path / "watched-run").mkdir()
    (tmp_path / "watched-run" / "old.json").write_text("{}")
    (tmp_path / "report.html").write_text("old")
    (tmp_path / "notes.txt").write_text("mine")
    prepare(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([MARKER, "notes.txt"])


def test_foreign_files_are_refused_and_left_alone(tmp_path: Path) -> None:
    (tmp_path / "report.html").write_text("my own report")
    (tmp_path / "data.csv").write_text("1,2")
    with pytest.raises(OutDirError, match=r"data\.csv"):
        prepare(tmp_path)
    assert (tmp_path / "report.html").read_text() == "my own report"
    assert not (tmp_path / MARKER).exists()


def test_the_first_demos_layout_is_recognised_as_a_previous_demo(tmp_path: Path) -> None:
    (tmp_path / "examples" / "nan-hf-run").mkdir(parents=True)
    (tmp_path / "report.json").write_text("{}")
    prepare(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [MARKER]


def test_an_examples_directory_with_other_content_is_not_taken_for_a_demo(tmp_path: Path) -> None:
    (tmp_path / "examples" / "my-run").mkdir(parents=True)
    with pytest.raises(OutDirError):
        prepare(tmp_path)
    assert (tmp_path / "examples" / "my-run").is_dir()


def test_a_file_in_place_of_the_directory_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "demo-out"
    target.write_text("not a directory")
    with pytest.raises(OutDirError, match="not a directory"):
        prepare(target)
