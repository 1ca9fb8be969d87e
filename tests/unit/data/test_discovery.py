"""imganom.data.discovery: discovery on real folder trees in tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest

from imganom.data.discovery import (
    MVTecItem,
    expand_inputs,
    find_images,
    is_mvtec_root,
    relative_id,
    scan_mvtec,
    train_val_split,
)


def touch(root: Path, *rels: str) -> None:
    for rel in rels:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")  # discovery never decodes


def rels(paths: list[Path], root: Path) -> list[str]:
    return [relative_id(p, root) for p in paths]


def test_find_images_nested_sorted_hidden_and_extensions(tmp_path):
    touch(tmp_path, "b/img.png", "a/img.png", "a/sub/img.PNG", "z.tif", "vol.nii.gz", "c.dcm", "notes.txt",
          "archive.gz", ".hidden.png", ".cache/x.png", "a/.git/y.png")
    found = find_images(tmp_path)
    ids = rels(found, tmp_path)
    assert ids == ["a/img.png", "a/sub/img.PNG", "b/img.png", "c.dcm", "vol.nii.gz", "z.tif"]
    assert len(set(ids)) == len(ids)  # same file names in different folders never collide
    assert rels(find_images(tmp_path, recursive=False), tmp_path) == ["c.dcm", "vol.nii.gz", "z.tif"]
    pngs = find_images(tmp_path, extensions=["png"])  # no dot, case-insensitive
    assert rels(pngs, tmp_path) == ["a/img.png", "a/sub/img.PNG", "b/img.png"]
    assert rels(find_images(tmp_path, extensions=(".nii.gz",)), tmp_path) == ["vol.nii.gz"]


def test_find_images_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        find_images(tmp_path / "nope")
    touch(tmp_path, "f.png")
    with pytest.raises(NotADirectoryError, match="f.png"):
        find_images(tmp_path / "f.png")


def test_relative_id(tmp_path):
    assert relative_id(tmp_path / "a" / "b.png", tmp_path) == "a/b.png"
    with pytest.raises(ValueError, match="not inside"):
        relative_id(tmp_path / "b.png", tmp_path / "a")


def make_mvtec(root: Path) -> None:
    touch(root, "train/good/000.png", "train/good/001.png", "test/good/000.png",
          "test/crack/000.png", "test/crack/001.png", "test/hole/000.jpg",
          "ground_truth/crack/000_mask.png", "ground_truth/hole/000_mask.bmp")


def test_scan_mvtec_with_missing_mask(tmp_path):
    make_mvtec(tmp_path)
    assert is_mvtec_root(tmp_path) and not is_mvtec_root(tmp_path / "train")
    lay = scan_mvtec(tmp_path)
    assert rels(lay.train, tmp_path) == ["train/good/000.png", "train/good/001.png"]
    assert lay.defect_types == ["crack", "hole"]
    by_id = {it.id: it for it in lay.test}
    assert list(by_id) == [
        "test/crack/000.png", "test/crack/001.png", "test/good/000.png", "test/hole/000.jpg"
    ]
    good = tmp_path / "test/good/000.png"
    assert by_id["test/good/000.png"] == MVTecItem(good, "test/good/000.png", 0, "good", None)
    assert by_id["test/crack/000.png"].mask_path == tmp_path / "ground_truth/crack/000_mask.png"
    assert by_id["test/hole/000.jpg"].mask_path == tmp_path / "ground_truth/hole/000_mask.bmp"  # any ext
    assert by_id["test/crack/001.png"].mask_path is None and by_id["test/crack/001.png"].label == 1
    assert lay.missing_masks == ["test/crack/001.png"]


def test_scan_mvtec_rejects_non_mvtec(tmp_path):
    touch(tmp_path, "train/good/0.png")
    with pytest.raises(ValueError, match="test"):
        scan_mvtec(tmp_path)
    with pytest.raises(ValueError, match="train"):
        scan_mvtec(tmp_path / "train")


def test_train_val_split_deterministic_disjoint_ordered():
    items = [f"img{i:03d}" for i in range(50)]
    tr, va = train_val_split(items, 0.2, seed=3)
    assert (tr, va) == train_val_split(items, 0.2, seed=3)
    assert len(va) == 10 and len(tr) == 40
    assert set(tr).isdisjoint(va) and sorted(tr + va) == items
    assert tr == sorted(tr) and va == sorted(va)  # original order kept
    assert train_val_split(items, 0.2, seed=4)[1] != va
    assert train_val_split(items[:2], 0.01, seed=0)[1] != []  # at least one val item
    assert train_val_split(items[:1], 0.5, seed=0) == (items[:1], [])
    assert train_val_split(items, 0.0, seed=0) == (items, [])
    assert len(train_val_split(items[:3], 0.9, seed=0)[0]) == 1  # never an empty train set
    with pytest.raises(ValueError, match="val_fraction"):
        train_val_split(items, 1.0, seed=0)


def test_expand_inputs_folder_file_and_list(tmp_path):
    touch(tmp_path, "lineA/a.png", "lineA/sub/a.png", "lineA/readme.md", "lineB/b.png",
          "single/one.tif", "odd/data.raw", "listed/x.png", "listed/y.png")
    lst = tmp_path / "batch.txt"
    lst.write_text("# comment\nlisted/x.png\n\n" + str(tmp_path / "listed/y.png") + "\n")
    out = expand_inputs([tmp_path / "lineA", tmp_path / "single/one.tif", lst, tmp_path / "odd/data.raw"])
    assert [(p.relative_to(tmp_path).as_posix(), i) for p, i in out] == [
        ("lineA/a.png", "lineA/a.png"),
        ("lineA/sub/a.png", "lineA/sub/a.png"),
        ("single/one.tif", "one.tif"),
        ("listed/x.png", "listed/x.png"),
        ("listed/y.png", str(tmp_path / "listed/y.png")),
        ("odd/data.raw", "data.raw"),  # explicit file kept despite its extension
    ]
    # one folder alone: ids relative to it, no prefix
    assert [i for _, i in expand_inputs([tmp_path / "lineA"])] == ["a.png", "sub/a.png"]


def test_expand_inputs_dedup_and_collisions(tmp_path):
    touch(tmp_path, "x/imgs/a.png", "y/imgs/a.png", "p/same.png", "q/same.png")
    out = expand_inputs([tmp_path / "x/imgs", tmp_path / "y/imgs", tmp_path / "x/imgs/a.png",
                         tmp_path / "p/same.png", tmp_path / "q/same.png", tmp_path / "x/../x/imgs"])
    assert [i for _, i in out] == ["imgs/a.png", "imgs/a.png~2", "same.png", "same.png~2"]
    assert len({p.resolve() for p, _ in out}) == 4


def test_expand_inputs_missing(tmp_path):
    touch(tmp_path, "ok.png")
    (tmp_path / "l.lst").write_text("gone.png\n")
    with pytest.raises(FileNotFoundError) as ei:
        expand_inputs([tmp_path / "ok.png", tmp_path / "nope.png", tmp_path / "l.lst"])
    assert "nope.png" in str(ei.value) and "gone.png" in str(ei.value) and "l.lst" in str(ei.value)
