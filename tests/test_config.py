import pytest

from pipeline.config import build_config, parse_override, parse_size


@pytest.mark.parametrize("text, n", [("400k", 400_000), ("1.5M", 1_500_000), ("2000", 2000), ("48", 48), (" 2K ", 2000)])
def test_parse_size(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["", "abc", "1.5", "0", "-3", "1.2345k", "10G"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_paper_defaults():
    cfg = build_config("paper")
    assert (cfg.targets.guidance_scale, cfg.targets.steps, cfg.targets.resolution) == (3.5, 25, 1024)
    assert cfg.targets.model == "stabilityai/stable-diffusion-xl-base-1.0"
    assert cfg.captions.model == "meta-llama/Llama-3.2-3B-Instruct" and cfg.captions.backend == "vllm"
    assert cfg.shards.shard_size == 1000


def test_profile_then_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("targets:\n  steps: 7\n  guidance_scale: 5\nshards:\n  shard_size: 3\n")
    cfg = build_config("tiny", dict([parse_override("targets.steps=9")]), f)
    assert cfg.targets.steps == 9  # explicit beats file
    assert cfg.targets.guidance_scale == 5.0 and isinstance(cfg.targets.guidance_scale, float)
    assert cfg.shards.shard_size == 3
    assert cfg.targets.model == "tiny:sdxl"  # from the profile


@pytest.mark.parametrize("override, message", [
    ("targets.stepz=3", "unknown config field"),
    ("nope.x=1", "unknown config field"),
    ("targets.steps=abc", "expects"),
    ("targets.steps=2.5", "expects"),
    ("captions.backend=gpt", "captions.backend"),
    ("segment.min_area=0.9", "min_area"),
])
def test_bad_overrides_say_what_is_wrong(override, message):
    with pytest.raises(ValueError, match=message):
        build_config("paper", dict([parse_override(override)]))


def test_override_needs_equals():
    with pytest.raises(ValueError, match="section.field=value"):
        parse_override("targets.steps")
