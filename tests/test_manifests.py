"""python -m manifests on a dataset written by the pipeline: show, verify (and what breaks it), sheet, stats."""

import io
import json
import re
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from conftest import ROOT, SIZE
from manifests.__main__ import main
from manifests.schema import read_manifests
from dreamcache.store import Store

pytestmark = pytest.mark.slow  # needs the pipeline's tiny dataset


@pytest.fixture
def ds(tiny_dataset, tmp_path):
    """A private copy of the tiny dataset, free to damage."""
    return shutil.copytree(tiny_dataset, tmp_path / "ds")


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_show_reports_the_right_totals(ds, capsys):
    code, out, _ = run(capsys, "show", ds, "--json")
    s = json.loads(out)
    assert code == 0 and s["complete"]
    assert s["totals"]["samples"] == SIZE and s["totals"]["shards"] == 3
    assert s["totals"]["bytes"] == sum(p.stat().st_size for p in (ds / "shards").glob("*.tar"))
    assert s["funnel"][-1] == ["segmented triplets", SIZE]
    assert sum(s["categories"].values()) == SIZE
    code, text, _ = run(capsys, "show", ds)
    assert f"{SIZE} / {SIZE} triplets in 3 shards" in text and "funnel" in text and "tiny:sdxl" in text


def test_verify_passes_on_what_the_pipeline_wrote(ds, capsys):
    for flags in ([], ["--checksums"], ["--deep"]):
        code, out, err = run(capsys, "verify", ds, *flags)
        assert code == 0, out + err
        assert out.startswith(f"OK: {SIZE} samples in 3 shards")


def test_verify_catches_one_flipped_byte(ds, capsys):
    tar = ds / "shards" / "shard-000001.tar"
    data = bytearray(tar.read_bytes())
    data[len(data) // 2] ^= 0x01
    tar.write_bytes(bytes(data))
    code, out, _ = run(capsys, "verify", ds, "--checksums")
    assert code == 1
    assert re.search(r"^shard-000001\.tar: sha256 .* does not match", out, re.M)
    assert "shard-000000" not in out and "shard-000002" not in out


def test_verify_catches_a_deleted_manifest(ds, capsys):
    (ds / "manifests" / "shard-000001.json").unlink()
    code, out, _ = run(capsys, "verify", ds)
    assert code == 1
    assert "shard-000001.tar: tar without a manifest" in out
    assert "shard-000002.tar: shards are not contiguous" in out
    assert "dataset.json: totals.samples is 48, the manifests sum to 32" in out


def test_verify_catches_a_duplicated_shard(ds, capsys):
    shutil.copy(ds / "shards" / "shard-000000.tar", ds / "shards" / "shard-000003.tar")
    m = json.loads((ds / "manifests" / "shard-000000.json").read_text())
    m["shard"] = "shard-000003.tar"
    (ds / "manifests" / "shard-000003.json").write_text(json.dumps(m))
    code, out, _ = run(capsys, "verify", ds)
    assert code == 1
    assert re.search(r"^shard-000003\.tar: duplicate key s0-\d+ \(also in shard-000000\.tar\)", out, re.M)
    assert "dataset.json: totals.samples" in out


def test_verify_catches_a_duplicated_tar_without_manifest_and_a_missing_tar(ds, capsys):
    shutil.copy(ds / "shards" / "shard-000002.tar", ds / "shards" / "shard-000007.tar")
    (ds / "shards" / "shard-000001.tar").unlink()
    code, out, _ = run(capsys, "verify", ds)
    assert code == 1
    assert "shard-000007.tar: tar without a manifest" in out
    assert "shard-000001.tar: missing: the manifest exists but the tar does not" in out


def test_verify_deep_decodes_every_member(ds, capsys):
    """Replace one mask with an RGB PNG and one target with garbage, keeping the tar well formed."""
    import tarfile

    path = ds / "shards" / "shard-000000.tar"
    with tarfile.open(path) as tar:
        members = [(i, tar.extractfile(i).read()) for i in tar.getmembers()]
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    mask_name = next(i.name for i, _ in members if i.name.endswith(".mask.png"))
    target_name = next(i.name for i, _ in members if i.name.endswith(".target.jpg"))
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            data = buf.getvalue() if info.name == mask_name else b"not a jpeg" if info.name == target_name else data
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    import hashlib  # a writer bug, not corruption: the manifest agrees with the bad tar

    manifest = ds / "manifests" / "shard-000000.json"
    m = json.loads(manifest.read_text())
    m["sha256"], m["bytes"] = hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_size
    manifest.write_text(json.dumps(m))
    assert run(capsys, "verify", ds, "--checksums")[1].count("shard-000000.tar") == 0
    code, out, _ = run(capsys, "verify", ds, "--deep")
    assert code == 1
    assert f"shard-000000.tar: {mask_name} does not decode: mask mode RGB, expected L" in out
    assert f"shard-000000.tar: {target_name} does not decode" in out


def test_sheet_embeds_every_image_and_filters(ds, tmp_path, capsys):
    out = tmp_path / "sheet.html"
    assert run(capsys, "sheet", ds, "--n", 10, "--seed", 1, "--out", out)[0] == 0
    page = out.read_text()
    uris = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', page)
    assert len(uris) == 30  # target, reference, overlay per card
    import base64

    for u in uris:
        Image.open(io.BytesIO(base64.b64decode(u))).load()
    keys = re.findall(r"<code>(s0-\d+)</code>", page)
    assert len(keys) == 10 == len(set(keys))
    run(capsys, "sheet", ds, "--n", 10, "--seed", 1, "--out", tmp_path / "again.html")
    assert re.findall(r"<code>(s0-\d+)</code>", (tmp_path / "again.html").read_text()) == keys  # reproducible
    run(capsys, "sheet", ds, "--n", 10, "--seed", 2, "--out", tmp_path / "other.html")
    assert re.findall(r"<code>(s0-\d+)</code>", (tmp_path / "other.html").read_text()) != keys
    category = read_manifests(Store(str(ds)))[0].samples[0].category
    run(capsys, "sheet", ds, "--category", category, "--out", tmp_path / "one.html")
    assert set(re.findall(r'data-category="([^"]+)"', (tmp_path / "one.html").read_text())) == {category}


def test_stats_writes_a_png(ds, tmp_path, capsys):
    out = tmp_path / "stats.png"
    code, text, _ = run(capsys, "stats", ds, "--out", out)
    assert code == 0 and f"{SIZE} samples" in text
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] >= 1000


def test_not_a_dataset_is_a_clear_error(tmp_path, capsys):
    code, _, err = run(capsys, "show", tmp_path)
    assert code == 2 and "no dataset.json" in err


def test_module_entry_point(ds):
    proc = subprocess.run([sys.executable, "-m", "manifests", "verify", str(ds)], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.startswith("OK:")


def test_huggingface_datasets_loads_the_shards(ds):
    from datasets import load_dataset

    data = load_dataset("webdataset", data_files={"train": sorted(str(p) for p in (ds / "shards").glob("*.tar"))},
                        split="train", cache_dir=str(ds.parent / "hf-cache"))
    assert len(data) == SIZE
    assert {"__key__", "txt", "json", "target.jpg", "reference.png", "mask.png"} <= set(data.column_names)
    row = data[0]
    assert row["target.jpg"].size == (64, 64) and row["mask.png"].mode == "L"
    assert row["json"]["caption"] == row["txt"]
