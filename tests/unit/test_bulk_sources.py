"""Bulk sources without a store: globs, manifest parsing and its errors, item ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from worker.bulk.errors import ManifestError
from worker.bulk.sources import (
    DEFAULT_INCLUDE,
    Item,
    KeyFilter,
    ManifestEntry,
    is_manifest,
    read_manifest,
    strip_etag,
)

# --- Globs -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    ["cat.jpg", "a/b/c/cat.jpg", "IMG_0001.JPG", "x.Jpeg", "p.png", "w.webp", "g.gif",
     "b.bmp", "t.tif", "t.TIFF", "with space/猫.png", ".jpg"],
)  # fmt: skip
def test_default_globs_take_every_decodable_extension_in_any_case(key: str) -> None:
    assert KeyFilter(DEFAULT_INCLUDE)(key)


@pytest.mark.parametrize(
    "key",
    ["notes.txt", "cat.jpg.bak", "doc.pdf", "vector.svg", "cat", "dir/", "cat.jpgx", "x.heic"],
)
def test_default_globs_leave_other_files_out(key: str) -> None:
    assert not KeyFilter(DEFAULT_INCLUDE)(key)


def test_include_replaces_the_defaults_and_exclude_wins() -> None:
    keep = KeyFilter(["raw/*", "*.png"], ["*/thumbs/*", "*_small.*"])
    assert keep("raw/a.cr2")
    assert keep("x/y.PNG")
    assert not keep("x/y.jpg")  # the default extensions no longer apply
    assert not keep("raw/thumbs/a.png")
    assert not keep("a_small.png")
    # fnmatch semantics: ? is one character, [] a class, * crosses "/".
    assert KeyFilter(["img-?.jpg"])("img-7.jpg") and not KeyFilter(["img-?.jpg"])("img-10.jpg")
    assert KeyFilter(["[ab]*.jpg"])("b/c.jpg") and not KeyFilter(["[ab]*.jpg"])("c.jpg")


def test_an_empty_include_takes_nothing() -> None:
    assert not KeyFilter([])("cat.jpg")


def test_manifests_are_told_from_prefixes_by_extension() -> None:
    assert is_manifest("list.txt") and is_manifest("s3://bkt/lists/all.JSONL")
    assert not is_manifest("s3://bkt/photos/") and not is_manifest("s3://bkt/photos")


def test_items_carry_bare_etags_and_only_the_overrides_they_have() -> None:
    assert strip_etag('"abc"') == "abc" and strip_etag(None) is None
    item = Item("a.jpg", "s3://bkt/p/a.jpg", "abc", 3)
    assert item.to_json() == {"id": "a.jpg", "image": "s3://bkt/p/a.jpg", "etag": "abc", "size": 3}
    item = Item("7", "s3://bkt/a.jpg", None, None, "Name it.", 20)
    assert item.to_json() == {
        "id": "7", "image": "s3://bkt/a.jpg", "etag": None, "size": None,
        "prompt": "Name it.", "max_new_tokens": 20,
    }  # fmt: skip


# --- Manifests ---------------------------------------------------------------------------------


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def entries(path: Path) -> list[ManifestEntry]:
    return list(read_manifest(path, path.suffix))


def test_txt_manifest_ids_are_line_numbers_and_comments_are_skipped(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "m.txt",
        "# my images\ns3://bkt/a.jpg\n\n  s3://bkt/dir/猫.png  \n# done\r\ns3://ckt/x.gif\n",
    )
    got = [(e.line, e.id, str(e.location)) for e in entries(path)]
    assert got == [
        (2, "2", "s3://bkt/a.jpg"),
        (4, "4", "s3://bkt/dir/猫.png"),
        (6, "6", "s3://ckt/x.gif"),
    ]


def test_jsonl_manifest_takes_ids_and_overrides(tmp_path: Path) -> None:
    lines = [
        {"image": "s3://bkt/a.jpg", "id": "cat"},
        {"image": "s3://bkt/b.jpg"},
        {"image": "s3://bkt/c.jpg", "prompt": "Name it.", "max_new_tokens": 20},
        {"image": "s3://bkt/d.jpg", "prompt": None, "id": None},
    ]
    path = write(tmp_path, "m.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n# end\n")
    got = [(e.id, str(e.location), e.prompt, e.max_new_tokens) for e in entries(path)]
    assert got == [
        ("cat", "s3://bkt/a.jpg", None, None),
        ("2", "s3://bkt/b.jpg", None, None),
        ("3", "s3://bkt/c.jpg", "Name it.", 20),
        ("4", "s3://bkt/d.jpg", None, None),
    ]


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("m.txt", "s3://bkt/a.jpg\nhttps://b/x.jpg\n", "manifest line 2: image URI"),
        ("m.txt", "s3://bkt/a.jpg\n\ns3://bkt\n", "manifest line 3"),
        ("m.jsonl", '{"image": "s3://bkt/a.jpg"}\n{"image": \n', "manifest line 2: not a JSON"),
        ("m.jsonl", '["s3://bkt/a.jpg"]\n', "manifest line 1: not a JSON object"),
        ("m.jsonl", '{"id": "x"}\n', "manifest line 1: no 'image'"),
        ("m.jsonl", '{"image": "s3://bkt/a.jpg", "caption": "x"}\n', "unknown field(s) 'caption'"),
        ("m.jsonl", '{"image": "s3://bkt/a.jpg", "id": 7}\n', "'id' must be a non-empty string"),
        ("m.jsonl", '{"image": "s3://bkt/a.jpg", "id": ""}\n', "'id' must be a non-empty string"),
        ("m.jsonl", '{"image": "s3://bkt/a.jpg", "prompt": 3}\n', "'prompt' must be a string"),
        ("m.jsonl", '{"image": "s3://bkt/a.jpg", "max_new_tokens": "9"}\n', "must be an integer"),
        ("m.jsonl", '{"image": "s3://bkt/a.jpg", "max_new_tokens": true}\n', "must be an integer"),
        ("m.jsonl", '{"image": 5}\n', "manifest line 1: image URI must be a string"),
    ],
)
def test_manifest_errors_name_the_line(tmp_path: Path, name: str, text: str, message: str) -> None:
    with pytest.raises(ManifestError, match=None) as caught:
        entries(write(tmp_path, name, text))
    assert message in str(caught.value)


def test_a_manifest_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.txt"
    path.write_bytes(b"s3://bkt/a.jpg\ns3://bkt/\xff\xfe.jpg\n")
    with pytest.raises(ManifestError, match="not UTF-8"):
        entries(path)


def test_the_check_hook_sees_every_entry_and_its_errors_name_the_line(tmp_path: Path) -> None:
    from worker.errors import InvalidRequest

    def check(entry: ManifestEntry) -> None:
        if entry.location.bucket == "forbidden":
            raise InvalidRequest("not this bucket")

    path = write(tmp_path, "m.txt", "s3://bkt/a.jpg\ns3://forbidden/b.jpg\n")
    with pytest.raises(ManifestError, match="manifest line 2: not this bucket"):
        list(read_manifest(path, ".txt", check))
