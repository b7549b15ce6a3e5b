"""Video heuristics: bounds from the probed header facts, static clips, blank frames; on real encoded videos
through ingest (frames sampled by PyAV) and on hand-made frame lists."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import polars as pl
import pytest
from PIL import Image

from curation.filters.video import VideoBlank, VideoBounds, VideoMotion
from curation.io.video import frame_size
from curation.sample.video import _X264, _encode, make_video, video_frames
from curation.schema import from_rows


def mp4(frames: list[Image.Image], fps: int = 10) -> bytes:
    return _encode(frames, *frames[0].size, fps, "libx264", "mp4", dict(_X264, crf="23"))


def solid(colour, size=(192, 144)) -> Image.Image:
    return Image.new("RGB", size, colour)


def moving(seconds: float, size=(192, 144), fps=10, seed=1) -> list[Image.Image]:
    frames, _, _ = video_frames(7, seed, size=size, seconds=seconds, fps=fps)
    return list(frames)


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def rows(*specs):
    return from_rows(
        [
            {"id": str(i), "modality": "video", "source_uri": "mem", "source_offset": i, **r}
            for i, r in enumerate(specs)
        ]
    )


def test_bounds_read_the_header_facts():
    meta = lambda **m: json.dumps(m)
    out = VideoBounds(min_duration=2, max_duration=60, min_side=128, min_fps=8)(
        rows(
            {"meta": meta(duration=10.0, video_width=320, video_height=240, fps=25.0)},
            {"meta": meta(duration=1.0, video_width=320, video_height=240, fps=25.0)},
            {"meta": meta(duration=99.0, video_width=320, video_height=240, fps=25.0)},
            {"meta": meta(duration=10.0, video_width=160, video_height=90, fps=25.0)},
            {"meta": meta(duration=10.0, video_width=320, video_height=240, fps=4.0)},
            {"meta": None},
        )
    ).to_pylist()
    assert [r["reject_reason"] for r in out] == [
        None,
        "duration_below_min",
        "duration_above_max",
        "side_below_min",
        "fps_below_min",
        "no_video_facts",
    ]
    assert out[0]["reject_detail"] is None and out[0]["score_video_bounds"] == 10.0
    assert out[3]["reject_detail"] == "shorter side (px) 90 < 128"
    # a bound set to null is not checked
    assert (
        VideoBounds(min_side=None)(
            rows(out[3] | {"reject_reason": None, "reject_stage": None, "reject_detail": None})
        ).to_pylist()[0]["reject_reason"]
        is None
    )
    with pytest.raises(ValueError, match="min_duration"):
        VideoBounds(min_duration=10, max_duration=5)


def test_motion_and_blank_on_frame_lists():
    pan = [jpeg(f) for f in moving(4, fps=1)]
    still = [jpeg(solid((30, 120, 200)))] * 4
    black = [jpeg(solid((0, 0, 0)))] * 4
    intro = [jpeg(solid((0, 0, 0)))] + pan[1:]
    out = VideoMotion()(
        rows({"frames": pan}, {"frames": still}, {"frames": pan[:1]}, {"frames": [b"junk", b"junk"]})
    )
    r = out.to_pylist()
    assert r[0]["reject_reason"] is None and r[0]["score_video_motion"] > 0.02
    assert r[1]["reject_reason"] == "static" and r[1]["score_video_motion"] < 0.003
    assert [x["reject_reason"] for x in r[2:]] == ["too_few_frames", "too_few_frames"]
    ts = [0.0, 1.0, 2.0, 3.0]
    b = VideoBlank()(
        rows(
            {"frames": pan, "frame_ts": ts},
            {"frames": black, "frame_ts": ts},
            {"frames": intro, "frame_ts": ts},
            {"frames": [b"junk"] * 3 + pan[:1], "frame_ts": ts},
            {"frames": None},
        )
    ).to_pylist()
    assert [x["reject_reason"] for x in b] == [None, "mostly_blank", None, "mostly_blank", "no_frames"]
    assert b[0]["score_video_blank"] == 0 and b[1]["score_video_blank"] == 1.0
    assert b[2]["score_video_blank"] == 0.25 and b[2]["video_blank_frames"] == [0.0]
    assert b[1]["reject_detail"] == "100% of the sampled frames are blank"


def test_video_filters_in_a_pipeline_on_encoded_videos(ray_local, tmp_path):
    from curation.pipeline import run_pipeline
    from curation.recipe import load_pipeline

    corpus = tmp_path / "videos"
    corpus.mkdir()
    videos = {
        "pan": make_video(7, 1, size=(224, 168), seconds=5, fps=10),
        "static": mp4(moving(0.1, seed=5)[:1] * 50),  # one drawn picture held for 5 s
        "black": mp4([solid((0, 0, 0))] * 50),
        "black_intro": mp4([solid((0, 0, 0))] * 10 + moving(4, size=(192, 144), seed=2)),
        "tiny": mp4(moving(4, size=(96, 64), seed=3)),
        "short": mp4(moving(0.5, seed=4)),
    }
    lines = []
    for name, data in videos.items():
        (corpus / f"{name}.mp4").write_bytes(data)
        lines.append(json.dumps({"video": f"{name}.mp4", "caption": f"the {name} video"}))
    (corpus / "videos.jsonl").write_text("\n".join(lines) + "\n")
    recipe = tmp_path / "video.yaml"
    recipe.write_text(f"""
name: video-filters
sources:
  - {{name: vids, format: jsonl, modality: video, paths: ["{corpus}/videos.jsonl"]}}
stages:
  - video_bounds: {{min_duration: 1.0, min_side: 128}}
  - video_blank: {{}}
  - video_motion: {{}}
output: {{path: "{tmp_path / "pool"}", report: false}}
""")
    result = run_pipeline(load_pipeline(recipe), progress=False)
    kept = pl.read_parquet(Path(result.pool) / "shards" / "*.parquet")
    rejects = pl.read_parquet(Path(result.pool) / "rejects" / "*.parquet")
    name = lambda v: Path(v).stem
    got = {name(v): r for v, r in zip(rejects["video"], rejects["reject_reason"])}
    got |= {name(v): None for v in kept["video"]}
    assert got == {
        "pan": None,
        "black_intro": None,
        "static": "static",
        "black": "mostly_blank",
        "tiny": "side_below_min",
        "short": "duration_below_min",
    }
    intro = kept.filter(pl.col("video").str.ends_with("black_intro.mp4")).row(0, named=True)
    assert intro["video_blank_frames"] == [0.0] and 0 < intro["score_video_blank"] < 0.5
    stages = {s["name"]: s for s in result.stats["stages"]}
    assert stages["video_motion"]["drops"] == {"static": 1}
    assert "score_video_motion" in stages["video_motion"]["histograms"]


# ---------------------------------------------------------------- shots


def three_shots(fps: int = 10) -> tuple[bytes, list[float]]:
    """Three scenes with hard cuts at 3.0 s and 5.0 s (each scene pans: motion is not a cut)."""
    a, b, c = moving(3, fps=fps, seed=11), moving(2, fps=fps, seed=12), moving(2.5, fps=fps, seed=13)
    return mp4(a + b + c, fps), [0.0, 3.0, 5.0]


def test_shots_are_found_at_hard_cuts_and_sampled_each():
    from curation.io.video import sample_shots

    data, starts = three_shots()
    info, shots = sample_shots(data, fps=1.0)
    assert [s.start for s in shots] == pytest.approx(starts, abs=0.11)
    assert [s.end for s in shots] == pytest.approx([3.0, 5.0, 7.5], abs=0.11)
    assert shots[0].cut_score is None and all(s.cut_score > 0.12 for s in shots[1:])
    for shot in shots:  # each shot's first frame, then one a second, timestamps absolute and inside the shot
        assert shot.ts[0] == pytest.approx(shot.start, abs=1e-6)
        assert all(shot.start - 1e-6 <= t < shot.end for t in shot.ts)
        assert len(shot.frames) == len(shot.ts) == math.ceil(shot.end - shot.start - 1e-6)
    assert info.duration == pytest.approx(7.5, abs=0.11)
    # a continuous video is one shot; a short flash does not make a shot of its own
    one = mp4(moving(4, seed=14))
    assert len(sample_shots(one)[1]) == 1
    flash = moving(2, seed=15)
    flashed = mp4(flash[:10] + [solid((255, 255, 255))] + flash[11:])
    assert len(sample_shots(flashed, min_shot_s=1.0)[1]) == 1
    # a shot longer than max_frames seconds keeps max_frames frames, evenly spread
    _, [long_shot] = sample_shots(one, fps=10, max_frames=5)
    assert len(long_shot.ts) == 5 and long_shot.ts[0] == 0.0 and long_shot.ts[-1] > 3.5


def test_shot_rows_through_ingest(ray_local, tmp_path):
    import tarfile

    from curation.pipeline import run_pipeline
    from curation.recipe import load_pipeline
    from curation.spec import RecipeError

    corpus = tmp_path / "videos"
    corpus.mkdir()
    cuts, _ = three_shots()
    (corpus / "cuts.mp4").write_bytes(cuts)
    (corpus / "one.mp4").write_bytes(mp4(moving(3, seed=21)))
    (corpus / "broken.mp4").write_bytes(cuts[: len(cuts) // 2])
    (corpus / "v.jsonl").write_text(
        "\n".join(
            json.dumps({"video": f"{n}.mp4", "caption": f"video {n}"}) for n in ("cuts", "one", "broken")
        )
        + "\n"
    )
    recipe = tmp_path / "shots.yaml"
    text = f"""
name: shots
sources:
  - name: vids
    format: jsonl
    modality: video
    paths: ["{corpus}/v.jsonl"]
    video: {{shots: true, fps: 2, max_side: 128}}
stages:
  - video_motion: {{min_motion: 0.0}}
output: {{path: "{tmp_path / "pool"}", report: false, formats: [parquet, webdataset]}}
"""
    recipe.write_text(text)
    result = run_pipeline(load_pipeline(recipe), progress=False)
    kept = pl.read_parquet(Path(result.pool) / "shards" / "*.parquet").sort("video", "clip_start")
    rejects = pl.read_parquet(Path(result.pool) / "rejects" / "*.parquet")
    assert kept.height == 4 and rejects.height == 1 and rejects["reject_reason"][0] == "unreadable_video"
    cut_rows = kept.filter(pl.col("video").str.ends_with("cuts.mp4"))
    assert cut_rows["clip_start"].to_list() == pytest.approx([0.0, 3.0, 5.0], abs=0.11)
    assert cut_rows["clip_end"].to_list() == pytest.approx([3.0, 5.0, 7.5], abs=0.11)
    for r in cut_rows.iter_rows(named=True):  # frames of the shot only, 2 a second, absolute timestamps
        assert all(r["clip_start"] - 1e-6 <= t < r["clip_end"] for t in r["frame_ts"])
        assert len(r["frame_ts"]) == math.ceil(2 * (r["clip_end"] - r["clip_start"]) - 1e-6)
        meta = json.loads(r["meta"])
        assert meta["shots"] == 3 and meta["duration"] == pytest.approx(7.5, abs=0.11)
        # max_side 128, then the model's 28-pixel grid
        assert Image.open(io.BytesIO(r["frames"][0])).size == frame_size(
            meta["video_width"], meta["video_height"], 128
        )
    assert len(set(kept["id"])) == 4  # each shot is a row of its own
    one = kept.filter(pl.col("video").str.ends_with("one.mp4")).row(0, named=True)
    assert one["clip_start"] == 0.0 and one["clip_end"] == pytest.approx(3.0, abs=0.11)
    # WebDataset: the frames and the span in the sample's json
    [tar] = list((Path(result.pool) / "shards").glob("*.tar"))
    with tarfile.open(tar) as t:
        metas = [json.loads(t.extractfile(m).read()) for m in t.getmembers() if m.name.endswith(".json")]
    assert sorted(round(m["clip_start"]) for m in metas) == [0, 0, 3, 5]
    # Options are checked with the recipe
    recipe.write_text(text.replace("shots: true, fps: 2", "shots: yes please, fps: -1"))
    with pytest.raises(
        RecipeError, match=r"video.shots: expected true or false.*\n.*video.fps: expected a positive"
    ):
        load_pipeline(recipe)


def test_a_decode_that_runs_too_long_is_given_up_with_a_reason():
    from curation.io.video import VideoError, sample_frames, sample_shots

    data = mp4(moving(3, seed=31))
    with pytest.raises(VideoError, match=r"decoding took longer than 1e-06 s \(stopped after 1 frame"):
        sample_frames(data, timeout_s=1e-6)
    with pytest.raises(VideoError, match="decoding took longer than"):
        sample_shots(data, timeout_s=1e-6)
    assert len(sample_frames(data, timeout_s=60).frames) == 4  # min_frames: 4


def test_videos_from_webdataset_tars_and_parquet_bytes(ray_local, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curation.pipeline import run_pipeline
    from curation.recipe import load_pipeline
    from tests.helpers.images import write_tar

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    a, b = mp4(moving(3, seed=41)), make_video(7, 42, size=(192, 144), seconds=3, fps=10)
    cuts, _ = three_shots()
    write_tar(
        corpus / "00000.tar",
        [  # video2dataset's layout
            {
                "__key__": "a",
                "mp4": a,
                "txt": b"first clip",
                "json": json.dumps({"url": "https://x/a"}).encode(),
            },
            {"__key__": "cuts", "mp4": cuts, "txt": b"three scenes"},
            {"__key__": "nomedia", "txt": b"a caption without its video"},
            {"__key__": "broken", "mp4": b"\x00\x00\x00\x18ftypmp42 not really", "txt": b"broken"},
        ],
    )
    pq.write_table(
        pa.table(
            {
                "caption": ["from bytes", "from a struct"],
                "video": [b, None],
                "clip": [None, {"bytes": a, "path": "clips/a.mp4"}],
            }
        ),
        corpus / "videos.parquet",
    )
    recipe = tmp_path / "v.yaml"
    recipe.write_text(f"""
name: video-sources
sources:
  - {{name: tars, format: webdataset, modality: video, paths: ["{corpus}/*.tar"], video: {{shots: true}}}}
  - {{name: bytes, format: parquet, modality: video, paths: ["{corpus}/videos.parquet"]}}
  - {{name: structs, format: parquet, modality: video, paths: ["{corpus}/videos.parquet"],
      fields: {{text: caption, video: clip}}}}
stages:
  - video_motion: {{min_motion: 0.0}}
output: {{path: "{tmp_path / "pool"}", report: false}}
""")
    result = run_pipeline(load_pipeline(recipe), progress=False)
    kept = pl.read_parquet(Path(result.pool) / "shards" / "*.parquet")
    rejects = pl.read_parquet(Path(result.pool) / "rejects" / "*.parquet")
    tars = kept.filter(pl.col("source") == "tars").sort("video", "clip_start")
    assert tars["video"].to_list() == [f"{corpus}/00000.tar#a.mp4"] + [f"{corpus}/00000.tar#cuts.mp4"] * 3
    assert json.loads(tars["meta"][0])["url"] == "https://x/a" and tars["text"][0] == "first clip"
    assert all(len(f) >= 2 for f in tars["frames"])  # 1 a second, at least 2 s a shot
    tar_rejects = rejects.filter(pl.col("source") == "tars")
    why = {
        json.loads(m)["__key__"]: (r, d)
        for m, r, d in zip(tar_rejects["meta"], tar_rejects["reject_reason"], tar_rejects["reject_detail"])
    }
    assert why["nomedia"][0] == "missing_video_file" and "has no mp4/webm" in why["nomedia"][1]
    assert why["broken"][0] == "unreadable_video"
    from_bytes = kept.filter(pl.col("source") == "bytes")
    assert (
        from_bytes["video"].to_list() == [f"{corpus}/videos.parquet#row0"]
        and len(from_bytes["frames"][0]) >= 3
    )
    assert rejects.filter(pl.col("source") == "bytes")["reject_reason"].to_list() == ["missing_video_file"]
    structs = kept.filter(pl.col("source") == "structs")
    assert structs["video"].to_list() == [f"{corpus}/clips/a.mp4"] and structs["text"].to_list() == [
        "from a struct"
    ]


def test_ocr_reads_burned_in_text_from_video_frames():
    pytest.importorskip("rapidocr")
    from curation.filters.ocr import Ocr
    from curation.io.video import sample_frames
    from curation.sample.video import make_burned_text

    texted = sample_frames(make_burned_text(3, 1, "Fresh Coffee Daily"))
    plain = sample_frames(make_video(3, 2))
    out = Ocr(frames_per_video=3)(
        rows(
            {"frames": texted.frames, "frame_ts": texted.ts},
            {"frames": plain.frames, "frame_ts": plain.ts},
            {"frames": None},
        )
    )
    r = out.to_pylist()
    lines = [x.lower().replace(" ", "") for x in r[0]["ocr_text"].split("\n") if x]
    assert (
        r[0]["ocr_status"] == "text" and lines.count("freshcoffeedaily") == 1
    )  # read on 3 frames, written once
    assert 0.01 < r[0]["score_ocr"] < 0.5  # the overlay's share of the frames
    assert {e["image"] for e in json.loads(r[0]["ocr_lines"])} == {
        0,
        len(texted.frames) // 2,
        len(texted.frames) - 1,
    }
    assert r[1]["ocr_status"] == "no_text" and r[1]["score_ocr"] == 0
    assert r[2]["reject_reason"] == "missing_frames"


def test_probe_says_whether_there_is_audio():
    import av
    import numpy as np

    from curation.io.video import probe

    assert probe(mp4(moving(2, seed=51))).audio is False
    buf = io.BytesIO()
    with av.open(buf, "w", format="matroska") as c:  # a video with a sound track
        v, a = c.add_stream("libx264", rate=10), c.add_stream("aac", rate=16000)
        v.width, v.height, v.pix_fmt = 192, 144, "yuv420p"
        a.layout = "mono"
        for k, img in enumerate(moving(1, seed=52)):
            f = av.VideoFrame.from_image(img)
            f.pts = k
            c.mux(v.encode(f))
        for lo in range(0, 16000, 1024):
            s = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            s.sample_rate, s.pts = 16000, lo
            c.mux(a.encode(s))
        c.mux(v.encode(None))
        c.mux(a.encode(None))
    assert probe(buf.getvalue()).audio is True


def test_clips_are_kept_whole_or_cut_at_their_shots(ray_local, tmp_path):
    import tarfile

    from curation.io.video import probe, sample_frames
    from curation.pipeline import run_pipeline
    from curation.recipe import load_pipeline
    from curation.sample.video import other_container

    corpus = tmp_path / "videos"
    corpus.mkdir()
    cuts, _ = three_shots()
    webm, _ = other_container(make_video(7, 61, size=(192, 144), seconds=3, fps=10), "webm")
    (corpus / "cuts.mp4").write_bytes(cuts)
    (corpus / "one.webm").write_bytes(webm)
    (corpus / "s.jsonl").write_text(json.dumps({"video": "cuts.mp4", "caption": "three scenes"}) + "\n")
    (corpus / "w.jsonl").write_text(json.dumps({"video": "one.webm", "caption": "one scene"}) + "\n")
    recipe = tmp_path / "clips.yaml"
    recipe.write_text(f"""
name: clips
sources:
  - {{name: shots, format: jsonl, modality: video, paths: ["{corpus}/s.jsonl"],
     video: {{shots: true, clip: true}}}}
  - {{name: whole, format: jsonl, modality: video, paths: ["{corpus}/w.jsonl"], video: {{clip: true}}}}
stages:
  - video_bounds: {{min_side: 64}}
output: {{path: "{tmp_path / "pool"}", report: false}}
""")
    result = run_pipeline(load_pipeline(recipe), progress=False)
    kept = pl.read_parquet(Path(result.pool) / "shards" / "*.parquet").sort("source", "clip_start")
    shots = kept.filter(pl.col("source") == "shots")
    assert shots.height == 3
    for r in shots.iter_rows(named=True):  # each shot its own MP4, starting at its cut
        info = probe(r["video_bytes"])
        assert info.codec == "h264" and info.duration == pytest.approx(
            r["clip_end"] - r["clip_start"], abs=0.15
        )
        first = sample_frames(r["video_bytes"], fps=1).frames[0]
        assert thumb_diff(first, r["frames"][0]) < 3 and json.loads(r["meta"])["clip_ext"] == "mp4"
        assert json.loads(r["meta"])["clip"] == "encode"  # ultrafast x264 places no keyframe at the cuts
    whole = kept.filter(pl.col("source") == "whole").row(0, named=True)
    assert whole["video_bytes"] == webm and json.loads(whole["meta"])["clip_ext"] == "webm"
    names = []
    for tar in (Path(result.pool) / "shards").glob("*.tar"):
        with tarfile.open(tar) as t:
            names += [m.name.split(".", 1)[1] for m in t.getmembers()]
    assert names.count("mp4") == 3 and names.count("webm") == 1  # video2dataset's members, beside the frames


def thumb_diff(a: bytes, b: bytes) -> float:
    import numpy as np

    g = lambda x: np.asarray(Image.open(io.BytesIO(x)).convert("L").resize((48, 36)), np.float32)
    return float(np.abs(g(a) - g(b)).mean())


def test_pools_keep_frames_or_clips_as_the_recipe_says(ray_local, tmp_path):
    """output.video: clip keeps the clip's bytes and the frames' timestamps, not the frames; frames drops the
    clip; a cut before the end (video_near_dedup) still hands its later stages the frames."""
    import tarfile

    from curation.mix.tokens import row_tokens
    from curation.pipeline import run_pipeline
    from curation.recipe import load_pipeline
    from curation.spec import RecipeError
    from curation.target.geometry import VisionConfig

    corpus = tmp_path / "videos"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"v{i}.mp4").write_bytes(make_video(7, 70 + i, size=(192, 144), seconds=3, fps=10))
    (corpus / "m.jsonl").write_text(
        "".join(json.dumps({"video": f"v{i}.mp4", "caption": "c"}) + "\n" for i in range(3))
    )

    def run(video: str, clip: bool, out: str, cut: bool = False):
        recipe = tmp_path / f"{out}.yaml"
        recipe.write_text(f"""
name: payload
sources:
  - {{name: v, format: jsonl, modality: video, paths: ["{corpus}/m.jsonl"],
     video: {{clip: {str(clip).lower()}}}}}
stages:
{"  - video_near_dedup: {}" if cut else ""}
  - video_motion: {{}}
output: {{path: "{tmp_path / out}", report: false, video: {video}}}
""")
        result = run_pipeline(load_pipeline(recipe), progress=False)
        kept = pl.read_parquet(Path(result.pool) / "shards" / "*.parquet")
        members = []
        for tar in (Path(result.pool) / "shards").glob("*.tar"):
            with tarfile.open(tar) as t:
                members += [m.name.split(".", 1)[1] for m in t.getmembers()]
        return result, kept, members

    result, kept, members = run("clip", True, "clip", cut=True)
    assert kept.height == 3 and kept["frames"].null_count() == 3 and kept["video_bytes"].null_count() == 0
    assert all(len(ts) >= 3 for ts in kept["frame_ts"])
    assert not any(m.startswith("frame") for m in members) and members.count("mp4") == 3
    motion = next(s for s in result.stats["stages"] if s["name"] == "video_motion")
    assert motion["drops"] == {} and kept["score_video_motion"].null_count() == 0  # it saw the frames
    # token counting without frames: as many frames as were sampled, at the video's size
    _, both, _ = run("both", True, "both")
    vision = VisionConfig()

    class Words:  # text does not matter here
        def count(self, texts):
            import numpy as np

            return np.array([len((t or "").split()) for t in texts], np.int64)

    counted = row_tokens(kept.sort("id").to_arrow(), Words(), vision)
    with_frames = row_tokens(both.sort("id").to_arrow(), Words(), vision)
    assert counted["visual_tokens"].tolist() == pytest.approx(with_frames["visual_tokens"].tolist(), rel=0.35)
    assert min(counted["visual_tokens"].tolist()) > 0

    _, kept, members = run("frames", True, "frames")
    assert kept["video_bytes"].null_count() == 3 and kept["frames"].null_count() == 0 and "mp4" not in members
    _, kept, _ = run("auto", False, "auto")
    assert kept["video_bytes"].null_count() == 3 and kept["frames"].null_count() == 0

    bad = tmp_path / "bad.yaml"
    bad.write_text((tmp_path / "auto.yaml").read_text().replace("video: auto", "video: clip"))
    with pytest.raises(
        RecipeError, match=r"output.video: clip keeps no frames, but source\(s\) v keep no clip"
    ):
        load_pipeline(bad)
