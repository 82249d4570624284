"""Step caching from the user's side (issue #11): --cache POLICY[:THRESHOLD], the .jsonl keys, the driver's check
that the model can use the cache before any Ray work, the manifest's cache record and the progress lines."""

from __future__ import annotations

import io
import json
import signal
from pathlib import Path

import pytest

import cluster.driver as driver_mod
from cluster.cli import main, parse_cache
from cluster.driver import Driver, Job
from cluster.progress import BarReporter, LineReporter
from cluster.prompts import PromptFileError, read_prompt_file
from cluster.validate import check_batch, check_config_cache, model_dit_config
from configs import load_config
from pipeline.request import GenerateRequest, Progress
from pipeline.step_cache import POLICIES, warmup_steps

TEACACHE_REFUSED = "cache teacache has coefficients only for Wan2.1 1.3B and 14B"


@pytest.fixture
def no_ray(monkeypatch):
    """In-process CLI runs where joining or starting Ray is a test failure."""

    def refuse(*a, **k):
        raise AssertionError("Ray was started for a run that had to be refused first")

    monkeypatch.setattr(driver_mod, "connect_ray", refuse)


def run_main(args, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    return e.value.code, capsys.readouterr().err


# -- --cache parsing ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("fbcache", ("fbcache", None)), ("teacache:0.1", ("teacache", 0.1)), ("off", ("off", None)),
    ("EasyCache:1e-3", ("easycache", 0.001)), (" fbcache : 1 ", ("fbcache", 1.0)),
])
def test_parse_cache_accepts(text, expected):
    assert parse_cache(text) == expected


@pytest.mark.parametrize("value, message", [
    ("nope", "unknown cache policy 'nope'"), ("", "no policy given"), (":0.1", "no policy given"),
    ("fbcache:", "the threshold must be a number"), ("fbcache:x", "the threshold must be a number, got 'x'"),
    ("fbcache:0", "in (0, 1], got 0"), ("fbcache:-0.5", "in (0, 1], got -0.5"), ("fbcache:2", "in (0, 1], got 2"),
    ("fbcache:nan", "must be a number, got 'nan'"), ("easycache:inf", "must be a number, got 'inf'"),
    ("fbcache:1_0", "must be a number, got '1_0'"), ("off:0.1", "off takes no threshold"),
])
@pytest.mark.parametrize("command", ["generate", "batch"])
def test_bad_cache_values_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, no_ray, command, value, message):
    """In this process (the real entrypoint's exit code and one line: tests/test_shard_cli.py), before any Ray."""
    (tmp_path / "p.txt").write_text("a red circle moving right\n")
    if command == "generate":
        args = ["generate", "a red circle moving right", "-o", tmp_path / "out" / "x.mp4", "--manifest",
                tmp_path / "m.jsonl"]
    else:
        args = ["batch", tmp_path / "p.txt", "-o", tmp_path / "out"]
    code, err = run_main([*args, f"--cache={value}"], capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "--cache" in lines[0] and message in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.txt"], "nothing may be written"


def test_cache_flag_sets_the_config_and_its_threshold(tmp_path):
    from cluster.cli import resolve_config

    teacache = tmp_path / "tea.yaml"  # a YAML tuned for another policy
    teacache.write_text("sampling:\n  cache: teacache\n  cache_threshold: 0.3\n")
    s = resolve_config(teacache, [], cache=("fbcache", None)).sampling
    assert (s.cache, s.cache_threshold) == ("fbcache", None), "another policy's threshold must not carry over"
    s = resolve_config(teacache, ["sampling.cache_threshold=0.15"], cache=("fbcache", None)).sampling
    assert (s.cache, s.cache_threshold) == ("fbcache", 0.15), "--set of the threshold beside --cache POLICY"
    s = resolve_config(teacache, ["sampling.cache_threshold=0.15"], cache=("easycache", 0.25)).sampling
    assert (s.cache, s.cache_threshold) == ("easycache", 0.25), "the flag wins, like --ulysses over --set"
    off = resolve_config(teacache, [], cache=("off", None)).sampling  # its threshold goes with it
    assert (off.cache, off.cache_threshold) == ("off", None)
    assert resolve_config(teacache, []).sampling.cache_threshold == 0.3
    s = resolve_config(teacache, [], cache=("teacache", None)).sampling
    assert (s.cache, s.cache_threshold) == ("teacache", 0.3), "the YAML's threshold for this very policy stays"


# -- prompt files -----------------------------------------------------------------------------------------------------


def test_jsonl_cache_keys(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a", "cache": "fbcache", "cache_threshold": 0.2}\n{"prompt": "b", "cache_threshold": 1}\n'
                 '{"prompt": "c", "cache": "off"}\n')
    specs = read_prompt_file(f)
    assert [s.overrides for s in specs] == [{"cache": "fbcache", "cache_threshold": 0.2}, {"cache_threshold": 1},
                                            {"cache": "off"}]
    request = GenerateRequest("a", **specs[0].overrides).resolve(load_config("tiny"))
    assert (request.cache, request.cache_threshold) == ("fbcache", 0.2)


@pytest.mark.parametrize("line", ['{"prompt": "x", "cache": 3}', '{"prompt": "x", "cache": true}',
                                  '{"prompt": "x", "cache": null}', '{"prompt": "x", "cache_threshold": "0.1"}',
                                  '{"prompt": "x", "cache_threshold": true}',
                                  '{"prompt": "x", "cache_threshold": [1]}'])
def test_jsonl_cache_key_types(tmp_path, line):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "fine", "cache": "fbcache"}\n' + line + "\n")
    with pytest.raises(PromptFileError, match=r"p\.jsonl:2: 'cache(_threshold)?' has the wrong type"):
        read_prompt_file(f)


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "x", "cache": "turbo"}', "cache must be one of off, teacache, fbcache, easycache, got turbo"),
    ('{"prompt": "x", "cache": "fbcache", "cache_threshold": -1}', "cache_threshold must be in (0, 1], got -1"),
    ('{"prompt": "x", "cache": "fbcache", "cache_threshold": 3}', "cache_threshold must be in (0, 1], got 3"),
    ('{"prompt": "x", "cache": ""}', "cache must be one of off, teacache, fbcache, easycache, got "),
    ('{"prompt": "x", "cache_threshold": 0.3}', "cache_threshold is set but cache is off"),
    ('{"prompt": "x", "cache": "fbcache", "cache_threshold": NaN}', "cache_threshold must be a finite number"),
    ('{"prompt": "x", "cache_threshold": 1e400}', "cache_threshold must be a finite number"),
    ('{"prompt": "x", "cache": "fbcache", "steps": 3}', "cache fbcache cannot skip anything in 3 steps"),
    ('{"prompt": "x", "cache": "teacache"}', TEACACHE_REFUSED),  # the model's DiT, read on the driver
])
def test_bad_cache_on_a_line_is_refused_before_anything_runs(tmp_path, capsys, no_ray, line, message):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "fine", "cache": "fbcache"}\n' + line + "\n")
    code, err = run_main(["batch", f, "-o", tmp_path / "out"], capsys)
    assert code == 2 and f"p.jsonl:2: {message}" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


# -- the model check before any Ray work -----------------------------------------------------------------------------


def test_teacache_on_the_embedded_model_is_refused_before_ray(tmp_path, capsys, no_ray):
    code, err = run_main(["generate", "a red circle moving right", "-o", tmp_path / "x.mp4", "--cache", "teacache"],
                         capsys)
    assert code == 2 and TEACACHE_REFUSED in err and "use fbcache, easycache" in err, err
    assert len(err.strip().splitlines()) == 1
    # config-level, even when every line picks a cache the model can use: the Driver would refuse that config
    (tmp_path / "p.jsonl").write_text('{"prompt": "a", "cache": "fbcache"}\n')
    code, err = run_main(["batch", tmp_path / "p.jsonl", "-o", tmp_path / "out", "--set", "sampling.cache=teacache"],
                         capsys)
    assert code == 2 and f"config: sampling.cache: {TEACACHE_REFUSED}" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl"]


def test_driver_refuses_before_ray_and_before_workers(no_ray):
    """Code that drives a Driver itself (not through the CLI) gets the same checks."""
    config = load_config("tiny", ["sampling.cache=teacache"])
    with pytest.raises(ValueError, match=f"sampling.cache: {TEACACHE_REFUSED}"):
        with Driver(config, progress=None):
            pass
    config = load_config("tiny")
    job = Job(3, GenerateRequest("a", cache="teacache").resolve(config), Path("x.mp4"))
    with pytest.raises(ValueError, match=f"prompt 3: {TEACACHE_REFUSED}"):
        check_batch([job], config, None)
    check_batch([Job(0, GenerateRequest("a", cache="easycache").resolve(config), Path("x.mp4"))], config, None)


def test_dit_config_of_a_weights_folder_is_read_from_its_headers(tmp_path):
    from tests.tiny_models import diffusers_dit, save_dit

    save_dit(diffusers_dit(0, num_attention_heads=3, attention_head_dim=12, num_layers=2), tmp_path / "wan",
             "pipeline")
    config = load_config("cpu-smoke", [f"model.path={tmp_path / 'wan'}", "sampling.steps=8"])
    dit = model_dit_config(config)
    assert (dit.dim, dit.num_heads, dit.num_layers) == (36, 3, 2)
    check_config_cache(config)  # off
    with pytest.raises(ValueError, match=f"{TEACACHE_REFUSED}, not this model \\(dim 36\\)"):
        check_config_cache(load_config("cpu-smoke", [f"model.path={tmp_path / 'wan'}", "sampling.steps=8",
                                                      "sampling.cache=teacache"]))
    # weights only on the cluster's nodes: the ranks check the model there; the driver still checks the rest
    remote = load_config("cpu-smoke", [f"model.path={tmp_path / 'elsewhere'}", "sampling.cache=teacache"])
    assert model_dit_config(remote) is None
    check_config_cache(remote)


# -- progress ---------------------------------------------------------------------------------------------------


def test_progress_shows_computed_steps(capsys):
    out = io.StringIO()
    lines = LineReporter(out)
    lines.start(0, "a", 0, 0)
    lines.event(0, Progress("r", "denoise", 20, 20, 11))
    lines.start(1, "b", 0, 0)
    lines.event(1, Progress("r", "denoise", 20, 20))
    said = out.getvalue().splitlines()
    assert said[1].startswith("[0] denoised (20 steps, 11 computed) in ")
    assert said[3].startswith("[1] denoised (20 steps) in ")
    bars = BarReporter()
    bars.start(0, "a", 0, 0)
    bars.event(0, Progress("r", "denoise", 7, 20, 5))
    assert bars.bars[0].n == 7 and bars.bars[0].total == 20 and "5/7 computed" in bars.bars[0].postfix
    bars.start(1, "b", 0, 0)
    bars.event(1, Progress("r", "denoise", 7, 20))
    assert not bars.bars[1].postfix
    bars.close()


# -- real runs: manifest record and progress lines --------------------------------------------------------------------


def _check_record(cache, policy, threshold, steps):
    assert (cache["policy"], cache["threshold"], cache["steps"]) == (policy, threshold, steps)
    skipped, spec = cache["skipped"], POLICIES[policy]
    assert cache["computed_steps"] + len(skipped) == steps and cache["computed_steps"] < steps, cache
    assert skipped == sorted(set(skipped)) and min(skipped) >= warmup_steps(spec, steps) and max(skipped) < steps - 1
    run = 1
    for a, b in zip(skipped, skipped[1:]):
        run = run + 1 if b == a + 1 else 1
        assert run <= spec.max_skips, skipped


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for both real runs of the module (each `odyssey` run in this process joins it instead of
    starting its own: ~5 s each on 2 cores)."""
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def odyssey_here(args, capsys) -> tuple[int, str]:
    """main(args) in this process on the shared Ray: (exit code, stderr). The CLI's SIGTERM handler is undone."""
    handler = signal.getsignal(signal.SIGTERM)
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    finally:
        signal.signal(signal.SIGTERM, handler)
    return code or 0, capsys.readouterr().err


def test_batch_with_caches_writes_the_record_and_shows_computed_steps(local_ray, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a red circle moving right", "seed": 1}\n'
                       '{"prompt": "a blue square moving up", "seed": 2, "cache": "off"}\n'
                       '{"prompt": "a green circle moving left", "seed": 3, "cache": "easycache", '
                       '"cache_threshold": 0.3, "steps": 16}\n')
    out = tmp_path / "out"
    code, stderr = odyssey_here(["batch", prompts, "-o", out, "--cache", "fbcache:0.3", "--progress", "lines"], capsys)
    assert code == 0, stderr
    records = {r["index"]: r for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}
    assert sorted(records) == [0, 1, 2]
    _check_record(records[0]["cache"], "fbcache", 0.3, 20)
    assert records[1]["cache"] is None
    _check_record(records[2]["cache"], "easycache", 0.3, 16)
    for i in (0, 2):
        c = records[i]["cache"]
        assert f"[{i}] denoised ({c['steps']} steps, {c['computed_steps']} computed) in " in stderr
        assert f"({c['policy']} 0.3: {c['computed_steps']} of {c['steps']} steps computed)" in stderr
    assert "[1] denoised (20 steps) in " in stderr


def test_generate_with_cache_writes_the_record(local_ray, tmp_path, capsys):
    code, stderr = odyssey_here(["generate", "a yellow square moving down", "-o", tmp_path / "x.mp4", "--seed", 5,
                                 "--cache", "fbcache:0.3", "--manifest", tmp_path / "m.jsonl", "--progress", "lines"],
                                capsys)
    assert code == 0, stderr
    record = json.loads((tmp_path / "m.jsonl").read_text())
    _check_record(record["cache"], "fbcache", 0.3, 20)
    assert record["request"]["cache"] == "fbcache" and record["config"]["sampling"]["cache_threshold"] == 0.3
    c = record["cache"]
    assert f"x.mp4 (fbcache 0.3: {c['computed_steps']} of 20 steps computed)" in stderr
