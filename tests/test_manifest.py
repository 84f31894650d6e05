"""Manifest schema: round trip, path resolution, and one error that lists every bad line."""

import json
import os

import pytest

from omniret_jax.data.manifest import ManifestError, ManifestRecord, load_manifest, read_manifest, write_manifest


def _write_lines(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def test_round_trip_and_relative_paths(tmp_path):
    records = [
        ManifestRecord(id="a", caption="a red circle", video=str(tmp_path / "clips" / "a.mp4")),
        ManifestRecord(id="b", caption="a low flute", video="/elsewhere/b.mp4",
                       audio=str(tmp_path / "b.wav"), start=1.5, end=4.0, meta={"pitch": "low"}),
    ]
    path = tmp_path / "manifest.jsonl"
    write_manifest(path, records)
    raw = [json.loads(line) for line in path.read_text().splitlines()]
    # Paths inside the manifest directory are stored relative, others stay absolute.
    assert raw[0] == {"id": "a", "caption": "a red circle", "video": os.path.join("clips", "a.mp4")}
    assert raw[1]["video"] == "/elsewhere/b.mp4" and raw[1]["audio"] == "b.wav"
    assert read_manifest(path) == records

    # Moving the corpus directory keeps relative paths valid: they resolve against the manifest.
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "m.jsonl").write_text(path.read_text())
    again = read_manifest(moved / "m.jsonl")
    assert again[0].video == str(moved / "clips" / "a.mp4")
    assert again[1].audio == str(moved / "b.wav") and again[1].start == 1.5


def test_all_bad_records_reported_at_once(tmp_path):
    good = {"id": "ok", "caption": "fine", "video": "v.mp4"}
    lines = [
        json.dumps(good),                                                          # 1 ok
        "{not json",                                                               # 2
        json.dumps({"caption": "x", "video": "v.mp4"}),                            # 3 no id
        json.dumps({"id": "  ", "caption": "x", "video": "v.mp4"}),                # 4 empty id
        json.dumps({"id": "c", "caption": "", "video": "v.mp4"}),                  # 5 empty caption
        json.dumps(good),                                                          # 6 duplicate
        json.dumps({"id": 7, "caption": ["x"], "video": "v.mp4"}),                 # 7 types
        json.dumps({"id": "d", "caption": "x", "video": "v.mp4", "start": 3, "end": 2}),  # 8
        json.dumps({"id": "e", "caption": "x", "video": "v.mp4", "start": -1}),    # 9
        json.dumps({"id": "f", "caption": "x", "video": "v.mp4", "colour": "red"}),  # 10
        "",                                                                        # blank: ignored
        json.dumps([1, 2]),                                                        # 12 not object
        json.dumps({"id": "g", "caption": "x", "video": "v.mp4", "end": True}),    # 13 bool time
    ]
    path = tmp_path / "bad.jsonl"
    _write_lines(path, lines)
    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    err = info.value
    by_line = {}
    for loc, reason in err.problems:
        by_line.setdefault(int(loc.rsplit(":", 1)[1]), []).append(reason)
    print(err)
    assert sorted(by_line) == [2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 13]
    assert "bad JSON" in by_line[2][0]
    assert "missing required key 'id'" in by_line[3][0]
    assert "'id' is empty" in by_line[4][0]
    assert "'caption' is empty" in by_line[5][0]
    assert "duplicate id 'ok' (first on line 1)" in by_line[6][0]
    assert any("'id' must be a string" in r for r in by_line[7])
    assert any("'caption' must be a string" in r for r in by_line[7])
    assert "must be < 'end'" in by_line[8][0]
    assert "negative" in by_line[9][0]
    assert "unknown key(s) ['colour']" in by_line[10][0]
    assert "JSON object" in by_line[12][0]
    assert "finite number" in by_line[13][0]
    # The message names file:line for each problem.
    assert f"{path}:8: 'start' (3.0) must be < 'end' (2.0)" in str(err)


def test_skip_keeps_valid_lines_and_reports_the_others(tmp_path):
    """on_bad_record="skip": one empty caption (or any bad line) no longer rejects the manifest."""
    good = {"id": "ok", "caption": "fine", "video": "v.mp4"}
    lines = [
        json.dumps(good),
        json.dumps({"id": "c", "caption": " ", "video": "v.mp4"}),                   # 2 empty caption
        json.dumps({"id": "d", "caption": "x", "video": "v.mp4", "start": 3, "end": 2}),  # 3 bad times
        json.dumps({"id": "f", "caption": "x", "video": "v.mp4", "colour": "red"}),  # 4 unknown key
        "{not json",                                                                 # 5
        json.dumps(good),                                                            # 6 duplicate
        json.dumps({"id": "g", "caption": "also fine", "video": "w.mp4", "end": 4.5}),
    ]
    path = tmp_path / "m.jsonl"
    _write_lines(path, lines)
    with pytest.raises(ManifestError):
        load_manifest(path)
    m = load_manifest(path, on_bad_record="skip")
    assert [r.id for r in m.records] == ["ok", "g"]
    assert [(b.line, b.code) for b in m.bad] == [(2, "empty_caption"), (3, "bad_time"), (4, "unknown_key"),
                                                 (5, "bad_json"), (6, "duplicate_id")]
    assert m.bad_counts() == {"empty_caption": 1, "bad_time": 1, "unknown_key": 1, "bad_json": 1, "duplicate_id": 1}
    assert "'colour'" in m.bad[2].message
    assert [r.id for r in read_manifest(path, on_bad_record="skip")] == ["ok", "g"]
    _write_lines(path, lines[1:3])
    with pytest.raises(ManifestError, match="2 bad record"):
        load_manifest(path, on_bad_record="skip")  # nothing valid left: still an error
    with pytest.raises(ValueError, match="on_bad_record"):
        load_manifest(path, on_bad_record="ignore")


def test_writer_validates_everything(tmp_path):
    path = tmp_path / "out.jsonl"
    with pytest.raises(ManifestError) as info:
        write_manifest(path, [{"id": "a", "caption": "x", "video": "v"},
                              {"id": "a", "caption": "x", "video": "v"},
                              {"id": "b", "caption": "x", "video": "v", "start": 5.0, "end": 1.0}])
    assert len(info.value.problems) == 2
    assert not path.exists()
    with pytest.raises(ManifestError, match="no records"):
        write_manifest(path, [])


def test_empty_manifest_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(ManifestError, match="no records"):
        read_manifest(path)
