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


# ------------------------------------------------------------------------------------------- one library, every command

def test_messages_name_the_field_and_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown config field 'targets.stepz'; known in targets: model, revision"):
        build_config("paper", {"targets.stepz": 3})
    with pytest.raises(ValueError, match=r"config field 'targets.steps' expects int, got 'abc'"):
        build_config("paper", {"targets.steps": "abc"})
    with pytest.raises(ValueError, match=r"config field 'targets.revision' expects str, got \[1, 2\]"):
        build_config("paper", {"targets.revision": [1, 2]})


def test_an_optional_stage_section_is_a_config_section_like_any_other(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("clip: {enabled: true, threshold: 0.25}\n")
    cfg = build_config("tiny", {"clip.threshold": 0.3}, f)
    assert cfg.clip.enabled and cfg.clip.threshold == 0.3 and cfg.clip.model == "tiny:clip"
    with pytest.raises(ValueError, match="clip.threshold must be a cosine similarity"):
        build_config("tiny", {"clip.threshold": 2})


def _printed(main, argv, capsys) -> str:
    assert main([*argv, "--print-config"]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", ["pipeline", "train", "evaluate"])
def test_print_config_reads_back_through_config_and_flags_win(command, tmp_path, capsys):
    """Every command resolves defaults < profile < --config < --set < flags with the same library, and what
    --print-config prints is a --config file that gives the same config back."""
    import yaml

    from dreamcache.cli import main as dreamcache
    from pipeline.run import main as pipeline
    from training.train import main as train

    main, argv, field, flag = {
        "pipeline": (pipeline, ["--size", "400k", "--out", str(tmp_path / "o"), "--profile", "tiny"], "seed", "--seed"),
        "train": (train, ["--profile", "tiny"], "seed", "--seed"),
        "evaluate": (dreamcache, ["evaluate", "--adapters", "a", "--dreambooth", "d", "--profile", "tiny"], "seed",
                     "--seed"),
    }[command]
    first = _printed(main, [*argv, "--set", f"{field}=5"], capsys)
    assert yaml.safe_load(first)[field] == 5
    saved = tmp_path / "c.yaml"
    saved.write_text(first)
    assert _printed(main, [*argv, "--config", str(saved)], capsys) == first
    assert yaml.safe_load(_printed(main, [*argv, "--config", str(saved), "--set", f"{field}=6"], capsys))[field] == 6
    if command != "pipeline":  # the pipeline's flags are the few shortcuts; every trainer/CLI field is a flag
        out = _printed(main, [*argv, "--config", str(saved), "--set", f"{field}=6", flag, "7"], capsys)
        assert yaml.safe_load(out)[field] == 7


def test_the_cli_derives_its_flags_from_the_command_configs(capsys):
    from dreamcache.cli import main, parse
    from dreamcache.commands import EvalConfig

    args, cfg = parse(["evaluate", "--adapters", "a", "--dreambooth", "d", "--subjects", "dog", "cat",
                       "--images-per-prompt", "2", "--profile", "tiny"])
    assert cfg == EvalConfig(adapters="a", dreambooth="d", subjects=("dog", "cat"), images_per_prompt=2, profile="tiny")
    assert (cfg.dino, cfg.clip, cfg.guidance, cfg.text_scale) == ("tiny:dino", "tiny:clip", "joint", 7.5)
    assert not parse(["personalize", "--adapters", "a", "--reference", "r", "--out", "o", "--no-segment"])[1].segment
    for argv, message in ((["generate", "--prompt", "p", "--out", "o"], "--cache is required"),
                          (["generate", "--cache", "c", "--prompt", "p", "--out", "o", "--steps", "x"],
                           "argument --steps: invalid int value: 'x'"),
                          (["generate", "--cache", "c", "--prompt", "p", "--out", "o", "--guidance", "both"],
                           "invalid choice: 'both'"),
                          (["evaluate", "--adapters", "a", "--dreambooth", "d", "--set", "prompts=0"],
                           "--prompts must be >= 1, got 0"),
                          (["evaluate", "--adapters", "a", "--dreambooth", "d", "--set", "promts=2"],
                           "unknown config field 'promts'")):
        try:
            status = main(argv)
        except SystemExit as e:  # argparse's own checks (choices) exit from the parser
            status = e.code
        err = capsys.readouterr().err
        assert status == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err
