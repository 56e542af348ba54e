"""Evaluation provenance: each images folder records what made its images; a rerun into the same --out with
another setup is refused naming what differs (nothing changed) or, with --regenerate, makes them again; the same
setup resumes without generating; and the report describes the images it scored."""

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from dreamcache.cli import main as cli
from test_evaluate import adapters, dreambooth  # noqa: F401 (fixtures)


def evaluate_args(dreambooth, adapters, out, *extra):
    return ["evaluate", "--profile", "tiny", "--adapters", str(adapters), "--dreambooth", str(dreambooth),
            "--subjects", "1", "--prompts", "1", "--images-per-prompt", "1", "--steps", "2", "--out", str(out), *extra]


def snapshot(folder):
    """Every file under ``folder``: its bytes' hash and its modification time."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def first_run(dreambooth, adapters, tmp_path_factory):
    """One tiny evaluation (1 subject, 1 prompt, 1 image, 2 steps) that the reruns below start from."""
    out = tmp_path_factory.mktemp("eval") / "out"
    assert cli(evaluate_args(dreambooth, adapters, out)) == 0
    return out


@pytest.fixture(scope="module")
def other_adapters(tmp_path_factory):
    from test_generation import write_adapters

    return write_adapters(tmp_path_factory.mktemp("other-adapters") / "adapters.safetensors", perturb=0.5)


def subject_folder(out):
    (folder,) = (out / "images").iterdir()
    return folder


def test_the_first_run_records_what_made_its_images(first_run, adapters):
    from dreamcache.generation import file_sha256

    record = json.loads((subject_folder(first_run) / "provenance.json").read_text())
    assert (record["adapters_sha256"], record["base"], record["steps"], record["guidance"], record["text_scale"],
            record["image_scale"], record["seed"], record["images_per_prompt"]) == (
        file_sha256(adapters), "tiny:sd15", 2, "joint", 7.5, None, 0, 1)  # joint guidance has no image scale
    assert record["sampler"] == {"scheduler": "DDIMScheduler", "eta": 0.0} and record["dtype"] == "float32"
    assert len(record["references"]) == 1 and len(record["references"][0]["sha256"]) == 16
    assert record["caching"]["timestep"] == 1 and record["segmenter"]["detector"] == "tiny:grounding-dino"
    assert len(record["prompts"]) == 1


@pytest.mark.parametrize("change, fields", [
    (["--steps", "3"], ["steps 2 -> 3"]),
    (["--text-scale", "5"], ["text_scale 7.5 -> 5.0"]),
    (["--preset", "official"], ["guidance \"joint\" -> \"combined\"", "image_scale null -> 0.4"]),
    (["--seed", "1"], ["seed 0 -> 1"]),
    (["--images-per-prompt", "2"], ["images_per_prompt 1 -> 2"]),
    ("other adapters", ["adapters_sha256 "]),
])
def test_a_rerun_with_another_setup_is_refused_naming_what_differs(first_run, dreambooth, adapters, other_adapters,
                                                                   change, fields, capsys):
    if change == "other adapters":
        args = evaluate_args(dreambooth, other_adapters, first_run)
    else:
        args = evaluate_args(dreambooth, adapters, first_run, *change)
    before = snapshot(first_run)
    capsys.readouterr()
    assert cli(args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--regenerate" in errors[0] and "images made with another setup" in errors[0]
    assert all(f in errors[0] for f in fields), errors[0]
    assert snapshot(first_run) == before  # nothing written, nothing removed


def test_the_same_setup_resumes_without_generating_and_more_prompts_extend_it(first_run, dreambooth, adapters,
                                                                              tmp_path, monkeypatch, capsys):
    from dreamcache.generation import DreamCachePipeline

    out = tmp_path / "out"
    shutil.copytree(first_run, out)
    image = next(subject_folder(out).glob("*.png"))
    kept = snapshot(subject_folder(out))

    def no_sampling(*args, **kwargs):
        raise AssertionError("an image was generated again")

    with monkeypatch.context() as m:
        m.setattr(DreamCachePipeline, "__call__", no_sampling)
        capsys.readouterr()
        assert cli(evaluate_args(dreambooth, adapters, out)) == 0
    assert "0 prompt(s) generated, 1 already on disk" in capsys.readouterr().out
    assert snapshot(subject_folder(out)) == kept

    assert cli(evaluate_args(dreambooth, adapters, out, "--prompts", "2")) == 0  # a longer prefix of the prompts
    assert "1 prompt(s) generated, 1 already on disk" in capsys.readouterr().out
    record = json.loads((subject_folder(out) / "provenance.json").read_text())
    assert len(record["prompts"]) == 2 and snapshot(subject_folder(out))[image.name] == kept[image.name]


def test_images_without_a_provenance_are_refused(first_run, dreambooth, adapters, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(first_run, out)
    (subject_folder(out) / "provenance.json").unlink()  # a folder written before provenance was recorded
    before = snapshot(out)
    assert cli(evaluate_args(dreambooth, adapters, out)) == 2
    assert "no provenance.json" in capsys.readouterr().err and snapshot(out) == before


def test_regenerate_replaces_the_stale_images_and_the_report_describes_the_images_scored(first_run, dreambooth,
                                                                                         adapters, tmp_path):
    """With --regenerate the images of the other setup are deleted and made again; the report's provenance is the
    folder's, and the scored image is what that record describes: made again from the record alone (its
    reference cut-out, caching seed and subject, prompt, seed, steps, guidance), it is the same image."""
    from dreamcache.evaluate import image_seed
    from dreamcache.generation import file_sha256, load_pipeline

    out = tmp_path / "out"
    shutil.copytree(first_run, out)
    folder = subject_folder(out)
    old = np.asarray(Image.open(folder / "00-0.png"))
    assert cli(evaluate_args(dreambooth, adapters, out, "--steps", "3", "--text-scale", "5", "--regenerate")) == 0
    record = json.loads((folder / "provenance.json").read_text())
    results = json.loads((out / "results.json").read_text())
    assert results["provenance"] == {f"images/{folder.name}": record}
    assert f"adapters sha256 {record['adapters_sha256']} on tiny:sd15" in (out / "results.md").read_text()
    assert (record["steps"], record["text_scale"]) == (3, 5.0)
    (scored,) = [r["path"] for r in results["images"]]
    image = np.asarray(Image.open(out / scored))
    assert np.abs(image.astype(int) - old.astype(int)).max() > 0  # made again, not the 2-step image

    pipe = load_pipeline(record["base"], adapters, device="cpu")
    assert pipe.adapters_metadata["adapters_sha256"] == record["adapters_sha256"] == file_sha256(adapters)
    cutout = Image.open(out / "references" / f"{folder.name}.png")
    cache = pipe.cache_reference([cutout], seed=record["caching"]["seed"], subject=record["caching"]["subject"])
    again = pipe(record["prompts"][0], cache=cache, guidance=record["guidance"], guidance_scale=record["text_scale"],
                 num_inference_steps=record["steps"], num_images_per_prompt=record["images_per_prompt"],
                 generator=[torch.Generator().manual_seed(image_seed(record["seed"], folder.name, 0, 0))]).images[0]
    assert np.array_equal(np.asarray(again), image)
