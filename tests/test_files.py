"""The one atomic write: a file or folder is replaced whole, a failed write leaves the old one, temporaries stay hidden."""

import pytest
from PIL import Image

from salun_sd.evaluation.imagefiles import list_images
from salun_sd.run.files import atomic, save_image, staging, write_json, write_text


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = write_text(tmp_path / "sub" / "a.txt", "old")
    with pytest.raises(RuntimeError):
        with atomic(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert path.read_text() == "old" and sorted(p.name for p in path.parent.iterdir()) == ["a.txt"]
    write_json(path, {"new": 1})
    assert path.read_text() == '{\n  "new": 1\n}' and sorted(p.name for p in path.parent.iterdir()) == ["a.txt"]


def test_a_folder_is_replaced_whole(tmp_path):
    out = tmp_path / "pipeline"
    for files in (["old.bin", "keep.json"], ["new.bin"]):
        with atomic(out) as tmp:
            tmp.mkdir()
            for name in files:
                (tmp / name).write_text(name)
    assert sorted(p.name for p in out.iterdir()) == ["new.bin"] and [p.name for p in tmp_path.iterdir()] == ["pipeline"]


def test_an_image_is_written_in_its_suffix_format_and_temporaries_are_not_images(tmp_path):
    image = Image.new("RGB", (4, 4), "red")
    save_image(image, tmp_path / "a.png")
    staging(tmp_path / "b.png").write_bytes(b"half a png")  # what a killed run leaves
    assert Image.open(tmp_path / "a.png").format == "PNG" and list_images(tmp_path) == [tmp_path / "a.png"]
