"""Adapters that share: the trainer's model card, ``python -m training.export``, and loading by folder or by a
Hugging Face repo id through huggingface_hub's cache (offline, a cache filled here)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from dreamcache.cards import read_front_matter
from dreamcache.generation import file_sha256

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("cards") / "run"
    proc = subprocess.run([sys.executable, "training/train.py", "--profile", "tiny", "--data", str(tiny_dataset),
                           "--out", str(out), "--max-steps", "2", "--checkpoint-every", "1", "--val-samples", "0"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_the_run_folder_holds_a_model_card_of_its_newest_adapters(run, tiny_dataset):
    card = (run / "README.md").read_text()
    front = read_front_matter(card)
    assert front["library_name"] == "dreamcache" and front["pipeline_tag"] == "text-to-image"
    recipe = front["dreamcache"]
    assert recipe["layers"][0] == "mid_block.attentions.0" and recipe["fusion"] == "concat"
    assert (recipe["cache_timestep"], recipe["cache_prompt"], recipe["resolution"], recipe["step"]) == (1, "", 32, 2)
    dataset = json.loads((tiny_dataset / "dataset.json").read_text())
    training = recipe["training"]
    assert training["dataset"]["samples"] == dataset["totals"]["samples"] and training["steps"] == 2
    assert training["data_fingerprint"] == dataset["fingerprint"]
    assert recipe["adapters_sha256"] == file_sha256(run / "adapters.safetensors")
    assert "base_model" not in front  # tiny:sd15 is no Hub model; a Hub id is named, with the relation "adapter"
    assert f"--adapters {run}" in card and "## Evaluation" not in card


def test_a_readme_of_the_users_own_is_left_alone(run, tmp_path, capsys):
    import dataclasses

    from dreamcache.store import Store
    from training.checkpoints import read_run, write_card
    from training.config import TrainConfig
    from training.runs import prepare

    out = tmp_path / "mine"
    out.mkdir()
    (out / "README.md").write_text("# my notes\n")
    config, record = read_run(Store(str(run)), "step-00000002")
    cfg = TrainConfig(**{k: v for k, v in config.items() if k in {f.name for f in dataclasses.fields(TrainConfig)}})
    write_card(Store(str(out)), run / "adapters.safetensors", cfg, record)
    assert (out / "README.md").read_text() == "# my notes\n" and "left as it is" in capsys.readouterr().err
    (out / "README.md").unlink()
    write_card(Store(str(out)), run / "adapters.safetensors", cfg, record)  # ours: written, and replaced later
    assert read_front_matter((out / "README.md").read_text())["dreamcache"]["step"] == 2
    (out / "adapters.safetensors").write_bytes(b"x")
    prepare(Store(str(out)), resume=False, overwrite=True)  # --overwrite: the run's card goes with its adapters
    assert not (out / "README.md").exists()


def test_export_writes_the_adapters_and_their_card_and_refuses_other_adapters_scores(run, tmp_path):
    from training.export import main

    evaluation = tmp_path / "eval"
    evaluation.mkdir()
    scores = {"dino": 0.61234, "clip_i": 0.7, "clip_t": 0.3, "mdino": None, "mclip_i": None, "images": 12}
    record = {"adapters_sha256": "0" * 16}
    (evaluation / "results.json").write_text(json.dumps({"overall": scores, "provenance": {"k1": record}}))
    out = tmp_path / "export"
    assert main([str(run), str(out), "--checkpoint", "step-00000001", "--evaluation", str(evaluation)]) == 2
    assert not out.exists()  # refused before anything was written
    assert main([str(run), str(out), "--checkpoint", "step-00000001", "--name", "org/dreamcache-tiny",
                 "--overwrite"]) == 0
    exported = file_sha256(out / "adapters.safetensors")
    assert exported == file_sha256(run / "checkpoints" / "step-00000001" / "adapters.safetensors")
    record["adapters_sha256"] = exported
    (evaluation / "results.json").write_text(json.dumps({"overall": scores, "provenance": {"k1": record}}))
    assert main([str(run), str(out), "--checkpoint", "step-00000001", "--evaluation", str(evaluation),
                 "--name", "org/dreamcache-tiny", "--overwrite"]) == 0
    card = (out / "README.md").read_text()
    front = read_front_matter(card)
    assert front["dreamcache"]["step"] == 1 and front["dreamcache"]["evaluation"]["dino"] == 0.6123
    assert "--adapters org/dreamcache-tiny" in card and "| DINO | 0.6123 |" in card
    assert front["dreamcache"]["adapters_sha256"] == exported
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    record["adapters_sha256"] = "0" * 16  # an export refused (scores of other adapters) leaves the earlier one as it was
    (evaluation / "results.json").write_text(json.dumps({"overall": scores, "provenance": {"k1": record}}))
    assert main([str(run), str(out), "--checkpoint", "step-00000002", "--evaluation", str(evaluation),
                 "--overwrite"]) == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main([str(run), str(tmp_path / "other"), "--checkpoint", "step-00000009"]) == 2
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert main([str(run), str(tmp_path / "busy"), "--overwrite"]) == 2 and (tmp_path / "busy" / "notes.txt").exists()


def hub_cache(root, repo: str, files: dict[str, bytes], commit: str = "a" * 40, ref: str = "main"):
    """A Hugging Face cache as ``hf download`` leaves it: refs/REF names the snapshot that holds the files."""
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / ref).write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)


def test_adapters_load_by_folder_and_by_hub_repo_id_offline(run, tmp_path):
    cache = tmp_path / "hf"
    newest, first = run / "adapters.safetensors", run / "checkpoints" / "step-00000001" / "adapters.safetensors"
    hub_cache(cache, "org/dreamcache-tiny", {"adapters.safetensors": newest.read_bytes()})
    hub_cache(cache, "org/dreamcache-tiny", {"adapters.safetensors": first.read_bytes()}, commit="b" * 40, ref="v1")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    code = ("import sys\nfrom dreamcache.generation import load_pipeline\n"
            "for ref in sys.argv[1:]:\n"
            "    m = load_pipeline('tiny:sd15', ref, device='cpu').adapters_metadata\n"
            "    print(m['adapters_sha256'], m['adapters'])\n")
    proc = subprocess.run([sys.executable, "-c", code, str(run), "org/dreamcache-tiny", "org/dreamcache-tiny@v1"],
                          capture_output=True, text=True, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == [file_sha256(newest), str(run), file_sha256(newest), "org/dreamcache-tiny@" + "a" * 40,
                                   file_sha256(first), "org/dreamcache-tiny@" + "b" * 40]  # named by the commit used

    reference = tmp_path / "ref.png"
    from PIL import Image

    Image.new("RGB", (48, 48), "white").save(reference)
    missing = subprocess.run([sys.executable, "-m", "dreamcache", "personalize", "--profile", "tiny", "--no-segment",
                              "--adapters", "org/not-cached", "--reference", str(reference), "--out",
                              str(tmp_path / "x.cache")], capture_output=True, text=True, cwd=ROOT, env=env)
    assert missing.returncode == 2 and "org/not-cached is not in the cache" in missing.stderr
    folder = subprocess.run([sys.executable, "-m", "dreamcache", "personalize", "--profile", "tiny", "--no-segment",
                             "--adapters", str(tmp_path), "--reference", str(reference), "--out",
                             str(tmp_path / "x.cache")], capture_output=True, text=True, cwd=ROOT, env=env)
    assert folder.returncode == 2 and "a folder without adapters.safetensors" in folder.stderr
    # personalize with a repo id, then generate with the adapters the cache names: the same commit, offline
    for command in (["personalize", "--profile", "tiny", "--no-segment", "--adapters", "org/dreamcache-tiny",
                     "--reference", str(reference), "--out", str(tmp_path / "hub.cache")],
                    ["generate", "--cache", str(tmp_path / "hub.cache"), "--prompt", "a toy", "--steps", "1",
                     "--out", str(tmp_path / "hub.png")]):
        done = subprocess.run([sys.executable, "-m", "dreamcache", *command], capture_output=True, text=True,
                              cwd=ROOT, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "hub.png").exists()


def test_the_dataset_folder_holds_its_card_and_the_readmes_line_loads_it(tiny_dataset, tmp_path):
    from datasets import load_dataset  # noqa: F401 - the README's line calls it

    from conftest import dataset_keys

    index = json.loads((tiny_dataset / "dataset.json").read_text())
    card = (tiny_dataset / "README.md").read_text()
    front = read_front_matter(card)
    samples = index["totals"]["samples"]
    assert front["configs"][0]["data_files"][0] == {"split": "train", "path": "shards/*.tar"}
    assert front["dreamcache"] == {"fingerprint": index["fingerprint"], "complete": True, "samples": samples,
                                   "shards": index["totals"]["shards"]}
    assert f"| segmented triplets | {samples} |" in card and "| segmentation | `tiny:sam` |" in card
    readme = next(x for x in (ROOT / "README.md").read_text().splitlines() if x.startswith('ds = load_dataset("webdataset"'))
    own = next(x for x in card.splitlines() if x.startswith('ds = load_dataset("webdataset"'))
    for line in (readme.replace("OUT", str(tiny_dataset)), own):  # the README's line, and the card's own
        call = line.split("=", 1)[1].split("  #")[0]
        ds = eval(call.replace('split="train")', f'split="train", cache_dir="{tmp_path}")'))
        assert len(ds) == samples and sorted(ds["__key__"]) == sorted(dataset_keys(tiny_dataset))
    assert {"txt", "json", "target.jpg", "reference.png", "mask.png"} <= set(ds.column_names)
    assert ds[0]["json"]["key"] == ds[0]["__key__"] and ds[0]["target.jpg"].size == (64, 64)


def test_manifests_card_writes_it_again(tiny_dataset, tmp_path):
    import shutil

    from manifests.__main__ import main

    copy = tmp_path / "ds"
    shutil.copytree(tiny_dataset, copy)
    (copy / "README.md").unlink()
    assert main(["card", str(copy)]) == 0
    assert (copy / "README.md").read_text() == (tiny_dataset / "README.md").read_text().replace(str(tiny_dataset), str(copy))
    assert main(["card", str(tmp_path / "nothing")]) == 2
    (copy / "README.md").write_text("# my notes\n")  # a README of the user's own is left alone
    assert main(["card", str(copy)]) == 2 and (copy / "README.md").read_text() == "# my notes\n"
