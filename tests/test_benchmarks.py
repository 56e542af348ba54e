"""The benchmark runner's report: BENCHMARKS.md keeps its hand-written parts, the runner's section is replaced."""

import pytest

from benchmarks.__main__ import BEGIN, END, markdown, write_markdown

REPORT = {
    "command": "python -m benchmarks --quick", "started": "2026-01-01T00:00:00", "quick": True,
    "hardware": {"device": "cpu", "cpu": "x86_64", "cpu_model": "Test CPU", "cores": 2, "torch_threads": 2,
                 "python": "3.11", "torch": "2.13.0"},
    "cases": {
        "adapter_overhead": {"latent": 16, "repeats": 5, "base_pass_s": 1.0, "cached_pass_s": 1.05, "ratio": 1.05},
        "generation": {"latent": 16, "steps": 4, "repeats": 2, "dreamcache_s": 6.0, "reference_every_step_s": 8.0,
                       "base_generation_s": 5.0, "caching_pass_s": 0.7, "dreamcache_before_s": 7.0,
                       "ratio_before": 0.875, "ratio": 0.75, "ratio_vs_base": 1.2, "projected_50_steps_ratio": 0.7,
                       "caching_vs_50_step_generation": 0.01},
        "pipeline": {"runs": [{"samples": 16, "ray_s": 20.0, "plain_loop_s": 2.0, "ratio": 10.0},
                              {"samples": 48, "ray_s": 25.0, "plain_loop_s": 4.0, "ratio": 6.25}],
                     "ratio": 6.25, "marginal_ray_s_per_sample": 0.156, "marginal_loop_s_per_sample": 0.062,
                     "marginal_ratio": 2.5},
        "sdxl": {"tflop_per_image": 338.1, "images_per_call": 4, "skipped": "timing needs a GPU"},
    },
}


def test_runner_section_is_replaced_and_the_rest_kept(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\nhand-written figures\n")
    write_markdown(REPORT, path)
    first = path.read_text()
    assert first.startswith("# Benchmarks\n\nhand-written figures\n") and first.count(BEGIN) == 1
    assert "**1.05x**" in first and "**0.75x**" in first and "**2.5x**" in first
    assert "on a GPU only" in first and "338.1 TFLOP per image" in first
    path.write_text(first + "\nafter the section\n")
    changed = {**REPORT, "cases": {**REPORT["cases"], "adapter_overhead": {**REPORT["cases"]["adapter_overhead"],
                                                                          "ratio": 1.5}}}
    write_markdown(changed, path)
    second = path.read_text()
    assert second.count(BEGIN) == 1 and second.count(END) == 1
    assert "**1.5x**" in second and "**1.05x**" not in second
    assert second.endswith("after the section\n") and "hand-written figures" in second


def test_adapter_flops_on_every_base_at_its_own_resolution():
    """Counted on the meta device: the SD 1.5 adapters' 25,207,040 parameters and 3.03M cache values, SDXL's at
    1024 px, and a pass with the cache costing more than the base pass but not double."""
    from benchmarks.unet import case_adapter_flops

    found = case_adapter_flops(("sd15", "sdxl"))["bases"]
    assert (found["sd15"]["adapter_parameters"], found["sd15"]["cache_values"]) == (25_207_040, 3_031_040)
    assert (found["sdxl"]["adapter_parameters"], found["sdxl"]["cache_values"], found["sdxl"]["resolution"]) == (
        206_551_040, 7_864_320, 1024)
    for f in found.values():
        assert 1 < f["ratio"] < 1.2 and f["joint_guidance_step_ratio"] == pytest.approx((1 + f["ratio"]) / 2, abs=1e-3)
    text = markdown({**REPORT, "cases": {"adapter_flops": {"bases": found}}})
    assert "| sdxl | 1024 px | 4 | 206,551,040 | 7,864,320 |" in text


def test_markdown_covers_only_the_cases_run():
    text = markdown({**REPORT, "cases": {"sdxl": {"tflop_per_image": 338.1, "images_per_call": 4, "skipped": "timing needs a GPU"}}})
    assert "SDXL" in text and "Adapter overhead" not in text


# ------------------------------------------------------------------------------------------ python -m benchmarks --gpu

def test_gpu_suite_runs_the_project_code_on_tiny_models_without_ray_webdataset_or_vllm(tmp_path):
    """The GPU machine has torch, transformers, accelerate, safetensors and diffusers only: the suite must run there.
    Here every case runs on the tiny models in bf16 on the CPU (what breaks in bf16 breaks here too)."""
    import json
    import subprocess
    import sys

    from conftest import ROOT

    blocked = ("ray", "webdataset", "vllm", "torchvision", "sentence_transformers", "s3fs")
    code = (f"import sys\nfor m in {blocked!r}:\n    sys.modules[m] = None\n"
            "from benchmarks.__main__ import main\nsys.exit(main(sys.argv[1:]))")
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\nhand-written\n")
    proc = subprocess.run([sys.executable, "-c", code, "--gpu", "--tiny", "--device", "cpu", "--sdxl-modes", "eager",
                           "--generate-modes", "eager", "compile", "--compile-backend", "aot_eager", "--out", str(tmp_path), "--markdown", str(md)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    c = report["cases"]
    assert not [name for name in c if "error" in c[name]], {n: c[n].get("error") for n in c}
    assert [r["batch"] for r in c["sdxl"]["runs"]] == [1, 2] and all(r["images_per_s"] > 0 for r in c["sdxl"]["runs"])
    assert c["sdxl"]["flop_per_image"] > 0 and c["sdxl"]["dtype"] == "torch.bfloat16"
    assert c["segment"]["stage_samples_per_s"] > 0 and c["segment"]["models_samples_per_s"] > 0
    runs = c["train"]["runs"]
    assert [(r["gradient_checkpointing"], r["target_latents"], r["reference_latents"], r["compile"],
             r["channels_last"]) for r in runs] == [
        (False, "encoded", "encoded", None, False), (True, "encoded", "encoded", None, False),
        (False, "cached", "encoded", None, False), (False, "cached", "encoded", "aot_eager", False),
        (False, "cached", "encoded", "aot_eager", True), (False, "cached", "cached", None, False),
        (False, "cached", "cached", "aot_eager", False), (False, "cached", "cached", "aot_eager", True)]
    assert all(r["samples_per_s"] > 0 for r in runs) and runs[3]["compile_s"] > 0
    t = c["train"]
    flop = t["flop_per_sample_cached"]
    assert flop["none"] == t["flop_per_sample"] > flop["targets"] > flop["targets+references"] > 0
    assert set(runs[2]["phases_s"]) == {"vae_encoder#1", "text_encoder#1", "unet#1", "unet#2", "rest"}  # no target encode
    assert set(runs[5]["phases_s"]) == {"text_encoder#1", "unet#1", "unet#2", "rest"}  # and no reference encode
    assert {"vae_encoder#1", "vae_encoder#2", "text_encoder#1", "unet#1", "unet#2", "rest"} == set(runs[0]["phases_s"])
    g = c["generate"]
    assert g["base_s"] > 0 and g["personalised_vs_base"] > 0 and g["unet_level"]["ratio"] > 0
    pr = g["profile"]  # the cache adds the adapters' operators, and no gather or scatter of rows
    assert pr["guided"]["operators"] > pr["base"]["operators"] > 0
    assert not {r["operator"] for r in pr["added"]} & {"aten::index", "aten::index_put", "aten::index_put_"}
    compiled = g["compiled"]["compile"]  # the same comparison with the U-Net compiled for sampling
    assert compiled["personalised_vs_base"] > 0 and compiled["warmup_s"] > 0
    x = c["generate_sdxl"]  # DreamCacheXLPipeline on tiny:sdxl, the SDXL spec's layers
    assert x["base"] == "sdxl" and x["resolution"] == 64 and x["adapter_overhead"]["ratio"] > 0
    text = md.read_text()
    assert text.startswith("# Benchmarks\n\nhand-written\n") and "## GPU figures" in text and "SDXL targets" in text
    assert "### Generation, SDXL: 64 px" in text and "`DreamCacheXLPipeline` without a cache" in text
    assert "One step's U-Net call under torch.profiler (CPU time (host))" in text
    assert "With the U-Net compiled for sampling" in text


def test_full_size_models_are_the_released_architectures():
    """The suite's random full-size models, built on the meta device (no memory, no time): parameter counts of
    the released checkpoints."""
    import torch

    from benchmarks import gpu

    unet, vae, text_encoder, _, scheduler = gpu.sd15_components(False, "meta", torch.bfloat16)
    assert (gpu.count_parameters(unet), gpu.count_parameters(vae), gpu.count_parameters(text_encoder)) == (
        859_520_964, 83_653_863, 123_060_480)
    assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.steps_offset == 1
    sdxl = gpu.sdxl_pipeline(False, "meta", torch.bfloat16)
    assert (gpu.count_parameters(sdxl.unet), gpu.count_parameters(sdxl.text_encoder_2)) == (2_567_463_684, 694_659_840)
    grounded = gpu.grounded_models(False, "meta", torch.bfloat16)
    assert gpu.count_parameters(grounded.sam) == 641_090_864  # facebook/sam-vit-huge
    assert grounded.detector.config.backbone_config.depths == [2, 2, 18, 2]  # Swin-B: grounding-dino-base


def test_gpu_report_in_the_repository_renders_the_benchmarks_section(tmp_path):
    """BENCHMARKS.md's GPU section is made from the committed H100 report; rendering it again changes nothing."""
    import json

    from benchmarks import gpu
    from conftest import ROOT

    report = json.loads((ROOT / "benchmarks" / "reports" / "h100.json").read_text())
    section = gpu.markdown(report)
    current = (ROOT / "BENCHMARKS.md").read_text()
    assert section in current
    assert "NVIDIA H100 80GB HBM3" in section and "torch 2.11.0+cu130" in section
    assert {"sdxl", "segment", "train", "generate"} <= set(report["cases"]) <= set(gpu.CASES)
    for case in report["cases"]:  # figures only for the cases that were measured
        cmds = report["cases"][case]["command"]
        assert "error" not in report["cases"][case]
        assert all(f"`{cmd}`" in section for cmd in ([cmds] if isinstance(cmds, str) else cmds))


def test_the_references_case_times_and_counts_k_references(monkeypatch):
    """K = 1, 2 on a tiny U-Net: the cache grows K-fold at 512 px, a pass with more tokens costs more FLOPs, and
    every timing is there; the markdown shows the rows."""
    import torch

    from benchmarks.unet import UNetBench, case_references
    from dreamcache.adapter import install_adapters
    from dreamcache.bases import base_spec

    unet = base_spec("tiny:sd15").build_unet(random_init=False).eval()
    install_adapters(unet)
    with torch.no_grad():
        r = case_references(UNetBench(8, unet=unet), steps=2, repeats=1, ks=(1, 2))
    one, two = r["runs"]
    assert two["cache_values_512px"] == 2 * one["cache_values_512px"] == 2 * 3_031_040
    assert 1 < one["flop_ratio_512px"] < two["flop_ratio_512px"] < 1.2
    assert all(x["pass_ratio"] > 0 and x["generation_vs_base"] > 0 for x in r["runs"])
    text = markdown({**REPORT, "cases": {"references": r}})
    assert "### 3b. Several references in one cache" in text and "6,062,080 values (12.1 MB fp16)" in text


def test_the_cluster_figures_share_one_window_in_which_every_actor_works(tmp_path):
    """Two SDXL actors and one segmentation actor, the second SDXL actor joining late and leaving early: the
    window runs from the first commit after the late one's first batch to the last commit before the early one's
    last, and the share and the rate are both taken over it."""
    import json

    from benchmarks.cluster import steady

    trace, out = tmp_path / "trace", tmp_path / "ds"
    trace.mkdir()
    (out / "manifests").mkdir(parents=True)
    spans = {"targets-a": [(0, 10), (10, 20), (20, 30), (30, 40), (40, 50), (50, 60)],
             "targets-b": [(15, 25), (25, 35), (35, 45)],  # joins at 15, done at 45
             "segment-c": [(12, 13), (22, 23), (32, 33), (42, 43), (52, 53)]}
    for name, rows in spans.items():
        (trace / f"{name}.tsv").write_text("".join(f"{name.split('-')[0]}\t{a}\t{b}\t8\n" for a, b in rows))
    seen = {}
    for i, t in enumerate((8, 18, 27, 31, 38, 44, 50, 58)):  # commits; 27 is the first after 25, 44 the last before 45
        name = f"shard-{i:06d}.json"
        (out / "manifests" / name).write_text(json.dumps({"count": 10 + i}))
        seen[name] = float(t)
    s = steady(out, seen, trace)
    assert s["window_s"] == 44 - 27 and s["shards"] == 3 and s["triplets"] == 13 + 14 + 15
    # targets-a is busy all 17 s, targets-b from 27 to 44 too; the segmentation actor 1 s in 32-33 and 42-43
    assert s["busy"] == {"targets": 34.0, "segment": 2.0}
    assert s["actors"] == {"targets": 2, "segment": 1}
    with pytest.raises(RuntimeError, match="raise --size"):
        steady(out, {k: v for k, v in seen.items() if v < 30}, trace)


def test_gpu_markdown_shows_fp8_beside_its_deviation_and_the_compiled_generation():
    """The rows a GPU run of the new modes adds: FP8's deviation from bf16 under the SDXL table, and generation
    compiled in each mode beside the base model compiled alike (figures made up; the layout is what is tested)."""
    import json

    from benchmarks import gpu
    from conftest import ROOT

    report = json.loads((ROOT / "benchmarks" / "reports" / "h100.json").read_text())
    report["cases"]["sdxl"]["fp8"] = {"layers": 512, "images": 8, "mean_abs_diff": 1.25, "max_abs_diff": 40.0,
                                      "psnr_db": 38.5}
    report["cases"]["generate"]["compiled"] = {
        "reduce-overhead": {"base_s": 1.5, "personalised_s": 1.56, "caching_s": 0.01, "warmup_s": 90.0,
                            "personalised_vs_base": 1.04, "median_personalised_vs_base": 1.05}}
    text = gpu.markdown(report)
    assert "on 512 linear layers" in text and "differ by 1.25 on average and 40.0 at most" in text
    assert "PSNR 38.5 dB" in text
    assert "| reduce-overhead | 1.5 s | 1.56 s | **1.04x** | 1.05x | 90.0 s |" in text
