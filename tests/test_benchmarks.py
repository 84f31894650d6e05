"""Benchmark adapters on small fixtures written in each benchmark's public annotation format."""

import csv
import json
import logging
import os
import pickle

import pytest

from omniret_jax.data.manifest import read_manifest
from omniret_jax.eval import benchmarks as B
from omniret_jax.eval.store import caption_entries


def media_dir(tmp_path, names):
    root = tmp_path / "media"
    root.mkdir()
    for n in names:
        (root / n).write_bytes(b"")
    return root


def write_csv(path, header, rows):
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def round_trip(result, tmp_path):
    out = tmp_path / "manifest.jsonl"
    B.write(result, out)
    back = read_manifest(out)
    assert [r.id for r in back] == [r.id for r in result.records]
    assert [r.meta for r in back] == [r.meta for r in result.records]
    assert all(os.path.isabs(r.video) for r in back)
    return back


def test_msrvtt_1ka_with_all_captions_and_missing_media(tmp_path, caplog):
    csv_path = write_csv(tmp_path / "MSRVTT_JSFUSION_test.csv",
                         ["key", "vid_key", "video_id", "sentence"],
                         [["ret0", "msr7020", "video7020", "a woman creating a fondant baby"],
                          ["ret1", "msr7021", "video7021", "a person is playing a guitar"],
                          ["ret2", "msr7022", "video7022", "a dog runs on the beach"]])
    data = {"videos": [{"video_id": "video7020"}], "sentences": [
        {"caption": "someone makes a cake", "video_id": "video7020", "sen_id": 140201},
        {"caption": "a woman creating a fondant baby", "video_id": "video7020", "sen_id": 140200},
        {"caption": "fondant art", "video_id": "video7020", "sen_id": 140199},
        {"caption": "a train", "video_id": "video1", "sen_id": 3}]}
    (tmp_path / "MSRVTT_data.json").write_text(json.dumps(data))
    root = media_dir(tmp_path, ["video7020.mp4", "video7022.mkv"])
    with caplog.at_level(logging.WARNING):
        res = B.msrvtt_1ka(csv_path, root, data_json=tmp_path / "MSRVTT_data.json")
    assert [r.id for r in res.records] == ["video7020", "video7022"]
    assert res.missing == ("video7021",) and "1 media files missing (skipped)" in caplog.text
    r0 = res.records[0]
    assert r0.caption == "a woman creating a fondant baby"
    assert r0.meta["captions"] == ["a woman creating a fondant baby", "fondant art",
                                   "someone makes a cake"]
    assert r0.video == str(root / "video7020.mp4") and r0.audio is None
    assert r0.meta["media"] == "video" and res.records[1].video.endswith("video7022.mkv")
    back = round_trip(res, tmp_path)
    assert [c for c, _ in caption_entries(back)] == ["video7020#0", "video7020#1", "video7020#2",
                                                     "video7022#0"]
    kept = B.msrvtt_1ka(csv_path, root, keep_missing=True)
    assert [r.id for r in kept.records] == ["video7020", "video7021", "video7022"]
    assert kept.records[1].video == str(root / "video7021.mp4")
    assert "kept with their expected path" in kept.summary()
    assert kept.records[0].meta["captions"] == ["a woman creating a fondant baby"]


def test_msvd_split_from_mapping(tmp_path):
    (tmp_path / "AllVideoDescriptions.txt").write_text(
        "# Microsoft Research Video Description Corpus\n# Language: English\n\n"
        "-4wsuPCjDBc_5_15 a squirrel is eating a peanut\n"
        "-4wsuPCjDBc_5_15 a chipmunk eats\n"
        "zv2RIbUsnSw_159_165 a man plays a flute\n"
        "abcTrain_1_5 a train video\n")
    (tmp_path / "youtube_mapping.txt").write_text(
        "abcTrain_1_5 vid1\nzv2RIbUsnSw_159_165 vid1970\n-4wsuPCjDBc_5_15 vid1301\n")
    root = media_dir(tmp_path, ["-4wsuPCjDBc_5_15.avi", "zv2RIbUsnSw_159_165.avi",
                                "abcTrain_1_5.avi"])
    res = B.msvd(tmp_path / "AllVideoDescriptions.txt", root,
                 mapping_path=tmp_path / "youtube_mapping.txt")
    assert [r.id for r in res.records] == ["-4wsuPCjDBc_5_15", "zv2RIbUsnSw_159_165"]
    assert res.records[0].meta["captions"] == ["a squirrel is eating a peanut", "a chipmunk eats"]
    assert res.records[0].meta["vid"] == "vid1301" and not res.missing
    train = B.msvd(tmp_path / "AllVideoDescriptions.txt", root,
                   mapping_path=tmp_path / "youtube_mapping.txt", split="train")
    assert [r.caption for r in train.records] == ["a train video"]
    round_trip(res, tmp_path)
    with pytest.raises(ValueError, match="unknown MSVD split"):
        B.msvd(tmp_path / "AllVideoDescriptions.txt", root,
               mapping_path=tmp_path / "youtube_mapping.txt", split="dev")


def test_didemo_paragraph_and_per_description(tmp_path):
    anns = [
        {"annotation_id": 1, "description": "the cliff comes into view", "times": [[3, 3], [2, 3]],
         "video": "24900693@N00_4378939929_d00bee9389.mov", "dl_link": "x"},
        {"annotation_id": 2, "description": "a person walks by", "times": [[0, 1]],
         "video": "10015567@N08_3655084291_d8b58466fa.mp4", "dl_link": "y"},
        {"annotation_id": 3, "description": "camera pans left", "times": [[4, 5]],
         "video": "24900693@N00_4378939929_d00bee9389.mov", "dl_link": "x"},
    ]
    (tmp_path / "test_data.json").write_text(json.dumps(anns))
    # the .mov was converted to .mp4 after download: found by stem
    root = media_dir(tmp_path, ["24900693@N00_4378939929_d00bee9389.mp4"])
    res = B.didemo(tmp_path / "test_data.json", root)
    assert [r.id for r in res.records] == ["24900693@N00_4378939929_d00bee9389"]
    assert res.missing == ("10015567@N08_3655084291_d8b58466fa",)
    r = res.records[0]
    assert r.caption == "the cliff comes into view camera pans left"
    assert r.meta["captions"] == [r.caption]
    assert r.meta["segments"][1] == {"description": "camera pans left", "times": [[4, 5]]}
    per = B.didemo(tmp_path / "test_data.json", root, paragraph=False)
    assert per.records[0].meta["captions"] == ["the cliff comes into view", "camera pans left"]
    round_trip(res, tmp_path)


def test_vatex_with_subset(tmp_path):
    entries = [{"videoID": "Ptf_2VRj-V0_000122_000132", "enCap": ["a man cuts wood", "wood is cut"],
                "chCap": ["..."]},
               {"videoID": "abc_000001_000011", "enCap": ["people dance", " "]},
               {"videoID": "zzz_000005_000015", "enCap": ["a cat sleeps"]}]
    (tmp_path / "vatex_validation_v1.0.json").write_text(json.dumps(entries))
    (tmp_path / "test_ids.txt").write_text("zzz_000005_000015\nPtf_2VRj-V0_000122_000132\n")
    root = media_dir(tmp_path, ["Ptf_2VRj-V0_000122_000132.mp4", "abc_000001_000011.webm",
                                "zzz_000005_000015.mp4"])
    res = B.vatex(tmp_path / "vatex_validation_v1.0.json", root)
    assert [r.id for r in res.records] == [e["videoID"] for e in entries]
    assert res.records[1].meta["captions"] == ["people dance"]  # blank caption dropped
    sub = B.vatex(tmp_path / "vatex_validation_v1.0.json", root,
                  video_ids=tmp_path / "test_ids.txt")
    assert [r.id for r in sub.records] == ["zzz_000005_000015", "Ptf_2VRj-V0_000122_000132"]
    with pytest.raises(ValueError, match="requested videoIDs are not in the file"):
        B.vatex(tmp_path / "vatex_validation_v1.0.json", root, video_ids=["nope"])
    round_trip(sub, tmp_path)


def test_clotho_audio_only(tmp_path):
    csv_path = write_csv(tmp_path / "clotho_captions_evaluation.csv",
                         ["file_name"] + [f"caption_{i}" for i in range(1, 6)],
                         [["Santa Motor.wav", "a motor hums", "an engine runs", "motor noise",
                           "a machine whirs", "humming"],
                          ["rain, on roof.wav", "rain falls", "water drips", "rain on a roof",
                           "a storm", "drizzle"]])
    root = media_dir(tmp_path, ["Santa Motor.wav", "rain, on roof.wav"])
    res = B.clotho(csv_path, root)
    r = res.records[1]
    assert r.id == "rain, on roof.wav" and r.caption == "rain falls"
    assert len(r.meta["captions"]) == 5 and r.meta["media"] == "audio"
    assert r.video == r.audio == str(root / "rain, on roof.wav")
    back = round_trip(res, tmp_path)
    assert len(caption_entries(back)) == 10
    bad = write_csv(tmp_path / "bad.csv", ["file_name", "text"], [["a.wav", "x"]])
    with pytest.raises(ValueError, match="caption_1..caption_5"):
        B.clotho(bad, root)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_sounddescs_pickle_split_and_refused_code(tmp_path):
    descriptions = {"07033137": "Birds singing in a forest.", "nhu05091190": "Door slams.",
                    "00008035": "Crowd cheering."}
    with open(tmp_path / "descriptions.pkl", "wb") as f:
        pickle.dump(descriptions, f)
    (tmp_path / "test_list.txt").write_text("nhu05091190\n07033137\n")
    root = media_dir(tmp_path, ["07033137.wav", "nhu05091190.wav"])
    res = B.sounddescs(tmp_path / "descriptions.pkl", root, split_list=tmp_path / "test_list.txt")
    assert [r.id for r in res.records] == ["nhu05091190", "07033137"]
    assert res.records[0].caption == "Door slams." and res.records[0].meta["media"] == "audio"
    everything = B.sounddescs(tmp_path / "descriptions.pkl", root, keep_missing=True)
    assert everything.missing == ("00008035",) and len(everything.records) == 3
    round_trip(res, tmp_path)
    # the same descriptions as CSV
    csv_path = write_csv(tmp_path / "d.csv", ["id", "description"], list(descriptions.items()))
    assert B.sounddescs(csv_path, root, split_list=["07033137"]).records[0].caption == \
        "Birds singing in a forest."
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"x": _Evil()}, f)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        B.sounddescs(tmp_path / "evil.pkl", root)
    with pytest.raises(ValueError, match="ids of the split have no description"):
        B.sounddescs(tmp_path / "descriptions.pkl", root, split_list=["nope"])


def test_audiocaps_grouping_patterns_and_times(tmp_path):
    csv_path = write_csv(tmp_path / "test.csv",
                         ["audiocap_id", "youtube_id", "start_time", "caption"],
                         [["103549", "7fmOlUlwoNg", "20", "Constant rattling noise"],
                          ["103548", "7fmOlUlwoNg", "20", "A rattling sound"],
                          ["103541", "6BJ455B1aAs", "0", "A man speaks"],
                          ["103542", "a_b-c", "30", "Wind blows"]])
    root = media_dir(tmp_path, ["7fmOlUlwoNg_20.wav", "Y6BJ455B1aAs.mp4"])
    res = B.audiocaps(csv_path, root)
    assert [r.id for r in res.records] == ["7fmOlUlwoNg_20", "6BJ455B1aAs_0"]
    r0, r1 = res.records
    assert r0.meta["captions"] == ["Constant rattling noise", "A rattling sound"]
    assert r0.meta["audiocap_ids"] == ["103549", "103548"] and r0.meta["media"] == "audio"
    assert r1.video.endswith("Y6BJ455B1aAs.mp4") and r1.meta["media"] == "video"
    assert r1.audio is None
    assert res.missing == ("a_b-c_30",) and r0.start is None
    timed = B.audiocaps(csv_path, root, clip_seconds=10.0, keep_missing=True)
    assert [(r.start, r.end) for r in timed.records] == [(20.0, 30.0), (0.0, 10.0), (30.0, 40.0)]
    round_trip(timed, tmp_path)


def test_all_missing_and_registry(tmp_path):
    assert set(B.ADAPTERS) == {"msrvtt_1ka", "msvd", "didemo", "vatex", "clotho", "sounddescs",
                               "audiocaps", "vdc", "dream1k", "carebench"}
    csv_path = write_csv(tmp_path / "t.csv", ["key", "vid_key", "video_id", "sentence"],
                         [["r", "m", "video1", "x"]])
    with pytest.raises(ValueError, match="all 1 media files are missing"):
        B.msrvtt_1ka(csv_path, media_dir(tmp_path, []))
    with pytest.raises(ValueError, match="is not a directory"):
        B.msrvtt_1ka(csv_path, tmp_path / "nowhere")


def write_jsonl(path, entries, extra_lines=()):
    with open(path, "w", encoding="utf-8") as f:
        for e in entries:
            f.write(json.dumps(e) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return path


def test_vdc_one_caption_field_per_manifest(tmp_path, caplog):
    """AuroraCap's VDC_1k.jsonl: VDC-D reads detailed_caption, VDC-O main_object_caption; an entry
    without the field is left out and listed."""
    caps = ("short", "detailed", "main_object", "background", "camera")
    entries = [{"video_id": f"vdc{i}", "video_name": f"clip_{i}.mp4", "video_source": "pexels",
                **{f"{c}_caption": f"{c} caption of clip {i}" for c in caps}} for i in range(3)]
    del entries[2]["detailed_caption"]
    path = write_jsonl(tmp_path / "VDC_1k.jsonl", entries, extra_lines=[""])
    root = media_dir(tmp_path, ["clip_0.mp4", "clip_1.mp4", "clip_2.mp4"])
    with caplog.at_level(logging.WARNING):
        d = B.vdc(path, root)
    assert d.benchmark == "vdc_d" and [r.id for r in d.records] == ["vdc0", "vdc1"]
    assert d.uncaptioned == ("vdc2",) and "1 entries without the caption left out" in caplog.text
    assert d.records[1].caption == "detailed caption of clip 1" and d.records[1].video.endswith("clip_1.mp4")
    o = B.vdc(path, root, caption="main_object")
    assert o.benchmark == "vdc_o" and [r.caption for r in o.records][2] == "main_object caption of clip 2"
    assert o.records[0].meta["caption_field"] == "main_object_caption" and not o.uncaptioned
    round_trip(o, tmp_path)
    with pytest.raises(ValueError, match="unknown VDC caption 'objects'"):
        B.vdc(path, root, caption="objects")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"video_id": "x"}])
    with pytest.raises(ValueError, match=r"lack key\(s\) \['video_id', 'video_name'\]"):
        B.vdc(bad, root)
    broken = write_jsonl(tmp_path / "broken.jsonl", entries[:1], extra_lines=["{not json"])
    with pytest.raises(ValueError, match="broken.jsonl:2: not JSON"):
        B.vdc(broken, root)


def test_dream1k_events_are_the_queries(tmp_path):
    """Tarsier's DREAM-1k.jsonl: every event sentence is a caption (DREAM-E scores each as a query,
    mode "all"); the placeholder video_file is ignored and the media found by vid."""
    entries = [{"idx": i, "vid": i, "dataset": "DREAM/live_action", "video_file": "<placeholder>",
                "text": {"prompt": "<video>\nDescribe the video in detail.", "response": f"story {i}"},
                "extra_info": {"duration": 2.5, "n_subjects": 1, "n_shots": 1, "n_events": 2,
                               "events": [f"event a of {i}", f"event b of {i}", " "]}} for i in (1, 2, 3)]
    entries[2]["extra_info"]["events"] = []
    path = write_jsonl(tmp_path / "DREAM-1k.jsonl", entries)
    root = media_dir(tmp_path, ["1.mp4", "2.webm"])
    res = B.dream1k(path, root)
    assert res.benchmark == "dream_e" and [r.id for r in res.records] == ["1", "2"] and res.uncaptioned == ("3",)
    r = res.records[0]
    assert r.meta["captions"] == ["event a of 1", "event b of 1"] and r.caption == "event a of 1"
    assert r.meta["description"] == "story 1" and r.meta["source"] == "DREAM/live_action"
    assert res.records[1].video.endswith("2.webm")
    back = round_trip(res, tmp_path)
    assert [cid for cid, _ in caption_entries(back)] == ["1#0", "1#1", "2#0", "2#1"]
    (tmp_path / "other").mkdir()
    named = B.dream1k(path, media_dir(tmp_path / "other", ["dream_1.mp4"]), name_patterns=("dream_{vid}",))
    assert [r.id for r in named.records] == ["1"] and named.missing == ("2",)


def test_carebench_caption_fields(tmp_path):
    entries = [{"video": f"videos/v_{i}.mp4", "caption": f"general {i}", "spatial_caption": f"where {i}",
                "temporal_caption": [f"then {i}", f"after {i}"], "events": []} for i in range(2)]
    path = tmp_path / "metadata.json"
    path.write_text(json.dumps(entries))
    root = media_dir(tmp_path, ["v_0.mp4", "v_1.mp4"])
    g = B.carebench(path, root)
    assert g.benchmark == "crb_g" and [r.id for r in g.records] == ["v_0", "v_1"]
    assert g.records[0].caption == "general 0" and g.records[0].meta["path"] == "videos/v_0.mp4"
    t = B.carebench(path, root, field="temporal_caption")
    assert t.benchmark == "crb_t" and t.records[1].meta["captions"] == ["then 1", "after 1"]
    assert B.carebench(path, root, field="spatial_caption").benchmark == "crb_s"
    with pytest.raises(ValueError, match="unknown CaReBench caption field 'caption_s'"):
        B.carebench(path, root, field="caption_s")
