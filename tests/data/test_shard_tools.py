"""make_shards / make_demo / verify_shards: layout, atomicity, resume, corruption reports."""

import io
import json
import re
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
import wids
from PIL import Image

from coatnet_scale.data.shards import TarIndex, load_manifest
from data_tools import make_demo, make_shards, verify_shards
from tests.data.conftest import image_folder, jpeg_bytes


def test_image_folder_round_trip(folder: Path, shards: Path) -> None:
    manifest = load_manifest(shards)
    assert manifest.classes == ("cat", "dog", "eel")
    assert [s.nsamples for s in manifest.shards] == [5, 5, 2]
    assert manifest.total_samples == 12
    stored = {}
    for shard in manifest.shards:
        index = TarIndex(shard.path)
        for i in range(len(index)):
            key, members = index.read(i)
            meta = json.loads(members["json"])
            stored[meta["path"]] = (members["jpg"], int(members["cls"]))
    for label, name in enumerate(manifest.classes):
        for path in sorted((folder / name).iterdir()):
            data, got_label = stored[f"{name}/{path.name}"]
            assert data == path.read_bytes()  # JPEGs are stored untouched
            assert got_label == label


def test_shards_are_readable_by_tar_webdataset_and_wids(shards: Path) -> None:
    manifest = load_manifest(shards)
    first = manifest.shards[0].path
    names = subprocess.run(["tar", "-tf", first], check=True, capture_output=True, text=True)
    assert sorted(names.stdout.split()[:3]) == ["000000000.cls", "000000000.jpg", "000000000.json"]
    samples = list(wds.WebDataset(first, shardshuffle=False))
    assert len(samples) == 5 and {"jpg", "cls", "json"} <= set(samples[0])
    dataset = wids.ShardListDataset(str(shards), localname=lambda url: url)
    assert len(dataset) == 12
    sample = dataset[7]
    source_class = sample[".json"]["path"].split("/")[0]  # wids decodes the JSON
    assert int(sample[".cls"]) == ["cat", "dog", "eel"].index(source_class)
    assert json.loads(shards.read_text())["__kind__"] == "wids-shard-index-v1"


def test_rerun_skips_finished_shards_and_rewrites_missing(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out2"
    argv = [str(folder), str(out), "--shard-samples", "4", "--workers", "2", "--quiet"]
    assert make_shards.main(argv) == 0
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    (out / "train-000001.tar").unlink()
    assert make_shards.main(argv) == 0
    second = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert second["train-000000.tar"] == first["train-000000.tar"]
    assert "train-000001.tar" in second
    assert not list(out.glob(".*tmp"))
    assert verify_shards.main([str(out / "train.json"), "--quiet"]) == 0


def test_list_input_byte_sized_shards_and_resizing(tmp_path: Path) -> None:
    src = tmp_path / "imgs"
    src.mkdir()
    lines = ["path\tlabel"]
    for i in range(6):
        (src / f"{i}.png").write_bytes(jpeg_bytes(i, size=(200, 120), fmt="PNG"))
        lines.append(f"imgs/{i}.png\t{'zebra' if i % 2 else 'ant'}")
    listing = tmp_path / "list.tsv"
    listing.write_text("\n".join(lines) + "\n")
    one = (src / "0.png").stat().st_size
    out = tmp_path / "out"
    code = make_shards.main(
        [
            "--list",
            str(listing),
            str(out),
            "--shard-bytes",
            str(2.5 * one),
            "--resize-shorter",
            "60",
            "--quiet",
        ]
    )
    assert code == 0
    manifest = load_manifest(out / "train.json")
    assert manifest.classes == ("ant", "zebra")
    assert [s.nsamples for s in manifest.shards] == [2, 2, 2]
    key, members = TarIndex(manifest.shards[0].path).read(1)
    img = Image.open(io.BytesIO(members["jpg"]))
    source = int(Path(json.loads(members["json"])["path"]).stem)  # imgs/N.png
    assert img.format == "JPEG" and min(img.size) == 60 and int(members["cls"]) == source % 2


def test_bad_input_fails_with_one_clear_line(tmp_path: Path, capsys) -> None:
    assert make_shards.main([str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert make_shards.main([str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    assert "no class sub-folders" in capsys.readouterr().err


def test_unreadable_source_image_is_skipped_and_reported(tmp_path: Path, capsys) -> None:
    root = image_folder(tmp_path / "src", {"a": 3})
    (root / "a" / "broken.png").write_bytes(b"not an image")
    code = make_shards.main([str(root), str(tmp_path / "out"), "--quiet"])
    assert code == 0
    assert "1 source images could not be read" in capsys.readouterr().err
    assert load_manifest(tmp_path / "out" / "train.json").total_samples == 3


def test_demo_dataset_is_real_digits(tmp_path: Path) -> None:
    manifests = make_demo.make_demo(tmp_path / "demo", size=32, shard_samples=500)
    train, val = load_manifest(manifests["train"]), load_manifest(manifests["val"])
    assert train.total_samples + val.total_samples == 1797
    assert train.classes == tuple(str(d) for d in range(10))
    key, members = TarIndex(train.shards[0].path).read(0)
    img = Image.open(io.BytesIO(members["jpg"]))
    assert img.size == (32, 32) and 0 <= int(members["cls"]) <= 9
    assert verify_shards.main([str(manifests["val"]), "--quiet"]) == 0


def _rewrite_member(tar_path: str, member_suffix: str, data: bytes) -> str:
    """Replace the first member ending in `member_suffix`; returns its key."""
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    target = next(m for m, _ in members if m.name.endswith(member_suffix))
    with tarfile.open(tar_path, "w") as tar:
        for m, content in members:
            content = data if m is target else content
            m.size = len(content)
            tar.addfile(m, io.BytesIO(content))
    return target.name.split(".")[0]


def test_verifier_reports_planted_corruption_by_key(shards: Path, capsys) -> None:
    manifest = load_manifest(shards)
    bad_key = _rewrite_member(manifest.shards[0].path, ".jpg", b"\xff\xd8garbage")
    no_label_key = _rewrite_member(manifest.shards[1].path, ".cls", b"seven")
    last = Path(manifest.shards[2].path)
    last.write_bytes(last.read_bytes()[: 1536 + 200])  # cut inside the second sample
    code = verify_shards.main([str(shards), "--quiet"])
    out = capsys.readouterr().out
    assert code == 1
    # named by key and by the source file (from the sample's KEY.json)
    assert re.search(rf"sample {bad_key} \((cat|dog|eel)/img\d+\.jpg\): image does not decode", out)
    assert re.search(rf"sample {no_label_key} \(.+\.jpg\): label b'seven' is not an integer", out)
    assert "train-000002.tar: truncated" in out
    assert "train-000000.tar: sha256 differs" in out
    last.unlink()
    assert verify_shards.main([str(shards), "--no-decode", "--quiet"]) == 1
    assert "train-000002.tar: missing" in capsys.readouterr().out


def test_folder_to_shards_to_pipeline_gives_the_same_images_and_labels(tmp_path: Path) -> None:
    from coatnet_scale.data.pipeline import eval_loader

    root = image_folder(tmp_path / "sq", {"x": 4, "y": 3}, size=(32, 32))
    assert (
        make_shards.main([str(root), str(tmp_path / "out"), "--shard-samples", "3", "--quiet"]) == 0
    )
    manifest = load_manifest(tmp_path / "out" / "train.json")
    source_of = {}
    for shard in manifest.shards:
        tar = TarIndex(shard.path)
        for i in range(len(tar)):
            key, members = tar.read(i)
            source_of[key] = json.loads(members["json"])["path"]
    by_source = {}
    for batch in eval_loader(manifest, 4, 0, 1, image_size=32, crop_pct=1.0, num_workers=0):
        for key, image, label, valid in zip(
            batch["key"], batch["image"], batch["label"], batch["valid"], strict=True
        ):
            if valid:
                by_source[source_of[key]] = (image, int(label))
    sources = sorted((root / "x").iterdir()) + sorted((root / "y").iterdir())
    assert len(by_source) == len(sources) == 7
    for path in sources:
        image, label = by_source[f"{path.parent.name}/{path.name}"]
        expected = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"))).permute(2, 0, 1)
        assert label == (0 if path.parent.name == "x" else 1)
        assert (image.int() - expected.int()).abs().max() <= 2  # bicubic at scale 1


def exif_rotated_jpeg(size: tuple[int, int], orientation: int) -> bytes:
    img = Image.fromarray(np.tile(np.linspace(0, 255, size[0], dtype=np.uint8), (size[1], 1)))
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    img.convert("RGB").save(out, format="JPEG", quality=95, exif=exif)
    return out.getvalue()


def test_inputs_are_shuffled_into_shards_that_mix_classes(tmp_path: Path, capsys) -> None:
    """An ImageFolder is listed class by class: without the shuffle each shard holds one or two
    classes (and batches read from a few shards a handful); the manifest records the seed and
    each shard's label histogram, which the loader's order choice reads."""
    from coatnet_scale.data.order import choose_order

    root = image_folder(tmp_path / "src", {f"c{i}": 12 for i in range(8)}, size=(16, 16))
    args = [str(root), "--shard-samples", "12", "--quiet"]
    assert make_shards.main([args[0], str(tmp_path / "mixed"), *args[1:]]) == 0
    assert make_shards.main([args[0], str(tmp_path / "sorted"), *args[1:], "--no-shuffle"]) == 0
    mixed = load_manifest(tmp_path / "mixed" / "train.json")
    sorted_ = load_manifest(tmp_path / "sorted" / "train.json")
    assert json.loads((tmp_path / "mixed" / "train.json").read_text())["shuffle_seed"] == 0
    assert all(len(labels) == 1 for labels in sorted_.shard_labels())  # one class per shard
    assert np.mean([len(labels) for labels in mixed.shard_labels()]) >= 5  # 8 classes x 12
    assert sum(sum(h.values()) for h in mixed.shard_labels()) == 96
    assert choose_order("auto", "m", mixed.shard_labels(), 4, (12,), 96).order == "window"
    assert choose_order("auto", "s", sorted_.shard_labels(), 4, (12,), 96).order == "global"


def test_broken_inputs_are_named_and_never_reach_the_shards(tmp_path: Path, capsys) -> None:
    root = image_folder(tmp_path / "src", {"a": 4, "b": 4}, size=(40, 30))
    good = (root / "a" / "img000.jpg").read_bytes()
    (root / "a" / "truncated.jpg").write_bytes(good[: len(good) // 2])  # a valid header
    (root / "a" / "empty.jpg").write_bytes(b"")
    (root / "b" / "notes.png").write_bytes(b"not an image at all")
    (root / "b" / "rotated.jpg").write_bytes(exif_rotated_jpeg((40, 20), orientation=6))
    out = tmp_path / "out"
    argv = [str(root), str(out), "--shard-samples", "3", "--quiet"]
    assert make_shards.main(argv) == 0
    err = capsys.readouterr().err
    expected = {
        "a/truncated.jpg": "truncated or corrupt",
        "a/empty.jpg": "empty file",
        "b/notes.png": "not an image",
    }
    for name, reason in expected.items():
        line = next(x for x in err.splitlines() if x.startswith(f"skipped {root / name}:"))
        assert reason in line and "BytesIO" not in line
    assert "3 source images could not be read and were skipped" in err
    manifest_body = json.loads((out / "train.json").read_text())
    skipped = {
        Path(s["source"]).relative_to(root).as_posix(): s["reason"]
        for s in manifest_body["skipped"]
    }
    assert set(skipped) == set(expected)
    manifest = load_manifest(out / "train.json")
    assert manifest.total_samples == 9  # 8 good + the rotated one
    # a re-run reuses every shard and still names the skipped inputs
    assert make_shards.main(argv) == 0
    again = capsys.readouterr().err
    assert all(f"skipped {root / name}:" in again for name in expected)

    # plain readers read every sample without an error handler
    urls = [s.path for s in manifest.shards]
    decoded = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert len(decoded) == 9 and all(s["jpg"].size[0] > 0 for s in decoded)
    by_source = {s["json"]["path"]: s["jpg"] for s in decoded}
    assert by_source["b/rotated.jpg"].size == (20, 40)  # EXIF orientation 6 applied
    assert next(s for s in decoded if s["json"]["path"] == "a/img000.jpg")["__key__"] is not None
    assert len(wids.ShardListDataset(str(out / "train.json"), localname=lambda u: u)) == 9
    for url in urls:
        subprocess.run(["tar", "-tf", url], check=True, capture_output=True)
    assert verify_shards.main([str(out / "train.json"), "--quiet"]) == 0
    from coatnet_scale.data.pipeline import eval_loader

    batches = list(eval_loader(manifest, 4, 0, 1, image_size=16, crop_pct=1.0, num_workers=0))
    assert sum(b["bad"] for b in batches) == 0 and sum(int(b["valid"].sum()) for b in batches) == 9


def test_a_listed_file_that_cannot_be_read_is_named(tmp_path: Path, capsys) -> None:
    src = image_folder(tmp_path / "src", {"a": 2})
    listing = tmp_path / "list.tsv"
    listing.write_text(f"{src}/a/img000.jpg\t0\n{src}/a/gone.jpg\t1\n{src}/a/img001.jpg\t1\n")
    assert make_shards.main(["--list", str(listing), str(tmp_path / "out"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert f"skipped {src}/a/gone.jpg: unreadable: No such file or directory" in err
    assert load_manifest(tmp_path / "out" / "train.json").total_samples == 2


def test_a_rerun_reuses_a_shard_only_for_the_same_job(folder: Path, tmp_path: Path) -> None:
    """Another seed (or shard size, or input list) writes the shards again: a manifest never
    describes shards written by another job (as after fixing class-sorted shards in place)."""
    out = tmp_path / "out"
    base = [str(folder), str(out), "--shard-samples", "4", "--quiet"]
    assert make_shards.main([*base, "--no-shuffle"]) == 0
    sorted_bytes = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    assert make_shards.main([*base, "--no-shuffle"]) == 0  # the same job: reused
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == sorted_bytes
    assert make_shards.main(base) == 0  # shuffled now: every shard written again
    shuffled = load_manifest(out / "train.json")
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} != sorted_bytes
    assert max(len(labels) for labels in shuffled.shard_labels()) > 1
    assert json.loads((out / "train.json").read_text())["shuffle_seed"] == 0
    assert verify_shards.main([str(out / "train.json"), "--quiet"]) == 0


def test_jpegs_without_rotation_are_stored_untouched(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "src", {"a": 2}, size=(40, 30))
    (root / "a" / "upright.jpg").write_bytes(exif_rotated_jpeg((40, 20), orientation=1))
    assert make_shards.main([str(root), str(tmp_path / "out"), "--quiet"]) == 0
    manifest = load_manifest(tmp_path / "out" / "train.json")
    key, members = next(
        (k, m)
        for shard in manifest.shards
        for k, m in (TarIndex(shard.path).read(i) for i in range(shard.nsamples))
        if json.loads(m["json"])["path"] == "a/upright.jpg"
    )
    assert members["jpg"] == (root / "a" / "upright.jpg").read_bytes()
