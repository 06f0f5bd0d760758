"""make_shards / make_demo / verify_shards: layout, atomicity, resume, corruption reports."""

import io
import json
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
    assert sample["__key__"] == "000000007" and int(sample[".cls"]) == 1
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
    assert img.format == "JPEG" and min(img.size) == 60 and int(members["cls"]) == 1


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
    assert f"sample {bad_key}: image does not decode" in out
    assert f"sample {no_label_key}: label b'seven' is not an integer" in out
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
    by_key = {}
    for batch in eval_loader(manifest, 4, 0, 1, image_size=32, crop_pct=1.0, num_workers=0):
        for key, image, label, valid in zip(
            batch["key"], batch["image"], batch["label"], batch["valid"], strict=True
        ):
            if valid:
                by_key[key] = (image, int(label))
    sources = sorted((root / "x").iterdir()) + sorted((root / "y").iterdir())
    assert len(by_key) == len(sources) == 7
    for index, path in enumerate(sources):
        image, label = by_key[f"{index:09d}"]
        expected = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"))).permute(2, 0, 1)
        assert label == (0 if path.parent.name == "x" else 1)
        assert (image.int() - expected.int()).abs().max() <= 2  # bicubic at scale 1
