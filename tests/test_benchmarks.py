"""The benchmark runner's report: BENCHMARKS.md keeps its hand-written parts, the runner's section is replaced."""

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
    assert "not measured (needs a GPU)" in first and "338.1 TFLOP per image" in first
    path.write_text(first + "\nafter the section\n")
    changed = {**REPORT, "cases": {**REPORT["cases"], "adapter_overhead": {**REPORT["cases"]["adapter_overhead"],
                                                                          "ratio": 1.5}}}
    write_markdown(changed, path)
    second = path.read_text()
    assert second.count(BEGIN) == 1 and second.count(END) == 1
    assert "**1.5x**" in second and "**1.05x**" not in second
    assert second.endswith("after the section\n") and "hand-written figures" in second


def test_markdown_covers_only_the_cases_run():
    text = markdown({**REPORT, "cases": {"sdxl": {"tflop_per_image": 338.1, "images_per_call": 4, "skipped": "timing needs a GPU"}}})
    assert "SDXL" in text and "Adapter overhead" not in text
