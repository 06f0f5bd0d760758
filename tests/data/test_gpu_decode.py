"""The device-decode path (`data.decode=gpu`): the workers hand over each JPEG encoded with the
crop window the CPU path would have drawn for the same slot; the device decodes, crops and
resizes. Same order, slot seeds, windows and draws as the CPU path; pixels within resampling
differences. The path runs on the CPU here (torchvision decodes there too); on CUDA (nvJPEG)
in the `cuda` test, which skips with the reason elsewhere and runs in `make gpu-check`."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from coatnet_scale.data import gpu_decode
from coatnet_scale.data.pipeline import BatchPlan, TrainLoader
from coatnet_scale.data.shards import load_manifest
from coatnet_scale.data.transforms import TrainAugment
from data_tools.make_shards import make_shards
from tests.data.test_decode import psnr, smooth_jpeg

AUG = TrainAugment(64, crop_scale_min=0.3, randaugment_n=2, randaugment_m=9, mixup_alpha=0.8)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_decode")
    items = []
    for i in range(24):
        path = tmp / "images" / f"{i:03d}.{'png' if i == 5 else 'jpg'}"
        path.parent.mkdir(exist_ok=True)
        if i == 5:  # a PNG: decoded on the worker even on the device path
            Image.open(io.BytesIO(smooth_jpeg(120, 90, i))).save(path)
        else:
            path.write_bytes(smooth_jpeg(160 + 8 * i, 120 + 4 * i, i))
        items.append((str(path), i % 3))
    _, path = make_shards(items, ["a", "b", "c"], tmp / "shards", "train", 8, progress=False)
    return load_manifest(path)


def batches(manifest, device_decode: bool, steps: int = 2) -> list[dict]:
    plan = BatchPlan(8, 8, 0, 1)
    loader = TrainLoader(
        [manifest], [1.0], 0, "exact", plan, AUG, 0, 0.5, "window", 2, device_decode
    )
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == steps:
            return out
    return out


def check_against_the_cpu_path(manifest, device: torch.device) -> None:
    for cpu, dev in zip(batches(manifest, False), batches(manifest, True), strict=True):
        assert cpu["key"] == dev["key"] and torch.equal(cpu["slot"], dev["slot"])
        assert torch.equal(cpu["label"], dev["label"])
        assert torch.equal(cpu["augment"], dev["augment"]) and torch.equal(cpu["mix"], dev["mix"])
        assert len(dev["encoded"]) == 8 - sum(k.endswith("005") for k in dev["key"])
        images, valid, labels, refused = gpu_decode.decode_batch(dev, device)
        assert images.device.type == device.type and bool(valid.all()) and not refused
        assert torch.equal(labels, cpu["label"])
        for a, b in zip(cpu["image"], images.cpu(), strict=True):
            assert psnr(a.permute(1, 2, 0).numpy(), b.permute(1, 2, 0).numpy()) >= 30.0


def test_the_device_path_keeps_the_cpu_paths_samples_windows_and_draws(manifest) -> None:
    check_against_the_cpu_path(manifest, torch.device("cpu"))


@pytest.mark.cuda
def test_nvjpeg_decodes_the_same_crops_on_cuda(manifest) -> None:
    check_against_the_cpu_path(manifest, torch.device("cuda"))
    # exact resume needs the same pixels whether the batch decoded at once or one by one
    batch = batches(manifest, True, steps=1)[0]
    datas = [torch.frombuffer(bytearray(c.data), dtype=torch.uint8) for _, c in batch["encoded"]]
    together = gpu_decode._decode(datas, torch.device("cuda"))
    for data, image in zip(datas, together, strict=True):
        alone = gpu_decode._decode([data], torch.device("cuda"))[0]
        assert torch.equal(alone, image)


def test_bytes_the_device_cannot_decode_are_bad_samples(manifest) -> None:
    """Counted and named by the loader like the workers' bad samples; the row becomes a copy,
    image and label, of the first good row (as the workers fill bad rows)."""
    plan = BatchPlan(8, 8, 0, 1)
    loader = TrainLoader([manifest], [1.0], 0, "exact", plan, AUG, 0, 0.5, "window", 2, True)
    batch = next(iter(loader))
    row, crop = batch["encoded"][2]
    batch["encoded"][2] = (row, type(crop)(b"\xff\xd8" + b"\x00" * 64 + b"\xff\xd9", crop.box))
    images, valid, labels, refused = gpu_decode.decode_batch(batch, torch.device("cpu"))
    assert not valid[row] and int(valid.sum()) == 7
    assert len(refused) == 1 and batch["key"][row] in refused[0]
    good = int(torch.nonzero(valid)[0])
    assert torch.equal(images[row], images[good]) and labels[row] == labels[good]
    loader.count_bad(refused)
    assert loader.bad_samples == 1 and loader.named == refused


def test_a_truncated_jpeg_is_bad_on_the_worker_whatever_its_crop() -> None:
    from coatnet_scale.data.transforms import UndecodableImage, crop_for_device

    data = smooth_jpeg(300, 200, 1)
    with pytest.raises(UndecodableImage, match="truncated"):
        crop_for_device(data[: len(data) * 2 // 3], AUG)


def test_auto_decodes_on_cuda_devices_that_can(monkeypatch) -> None:
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(gpu_decode, "_cannot_decode_on", lambda device: None)
    assert gpu_decode.resolve("auto", cuda) and gpu_decode.resolve("gpu", cuda)
    assert not gpu_decode.resolve("auto", torch.device("cpu"))
    assert not gpu_decode.resolve("cpu", cuda)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        gpu_decode.resolve("gpu", torch.device("cpu"))
    # a torchvision without nvJPEG: auto falls back to the workers and says so; gpu refuses
    monkeypatch.setattr(gpu_decode, "_cannot_decode_on", lambda device: "not compiled with nvjpeg")
    notes = []
    assert not gpu_decode.resolve("auto", cuda, notes.append)
    assert "decoding on the CPU workers" in notes[0] and "nvjpeg" in notes[0]
    with pytest.raises(ValueError, match="cannot decode JPEGs"):
        gpu_decode.resolve("gpu", cuda)
