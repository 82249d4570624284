"""Config UX (issue #16): unknown keys named as typed with what is there instead, config files over a base preset,
`config show` saying where a config came from, `config presets`, --debug keeping exit codes, the download command
in missing-weights errors, and `~` in every path the CLI, the config and the loaders take."""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import configs.presets
from configs import (ConfigError, OdysseyConfig, SamplingConfig, from_dict, list_presets, load_config, read_yaml,
                     to_dict)

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = [f.name for f in dataclasses.fields(OdysseyConfig)]


def odyssey_main(capsys, *args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `odyssey ARGS` run in this process through cluster.cli.main."""
    from cluster.cli import main

    before = signal.getsignal(signal.SIGTERM)  # main() installs its own handler
    code = 0
    try:
        main(list(args))
    except SystemExit as e:
        code = e.code
    finally:
        signal.signal(signal.SIGTERM, before)
    out = capsys.readouterr()
    return code, out.out, out.err


def odyssey_process(*args, home: Path | None = None, cwd: Path = ROOT):
    import os

    env = dict(os.environ, **({"HOME": str(home)} if home else {}))
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "cluster.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=120, cwd=cwd, env=env)


# -- 5: unknown keys ------------------------------------------------------------------------------------------------

SAMPLING = ", ".join(f.name for f in dataclasses.fields(SamplingConfig))


@pytest.mark.parametrize("override, message", [
    ("no.such.key=1", f"unknown config key 'no.such.key' ('no' is not a section; sections: {', '.join(SECTIONS)})"),
    ("sampling.step=10", "unknown config key 'sampling.step' (sampling has no setting 'step'; did you mean "
                         "'sampling.steps'?)"),
    ("sampling.foo=1", f"unknown config key 'sampling.foo' (sampling has no setting 'foo'; sampling settings: "
                       f"{SAMPLING})"),
    ("samplng.steps=3", "unknown config key 'samplng.steps' ('samplng' is not a section; did you mean "
                        "'sampling.steps'?)"),
    ("steps=3", "unknown config key 'steps' ('steps' is not a section; did you mean 'sampling.steps'?)"),
    ("video.steps=3", "unknown config key 'video.steps' (video has no setting 'steps'; did you mean "
                      "'sampling.steps'?)"),
    ("parallel.ulysses=2", "unknown config key 'parallel.ulysses' (parallel has no setting 'ulysses'; did you mean "
                           "'parallel.ulysses_degree'?)"),
    ("model.pth=/w", "unknown config key 'model.pth' (model has no setting 'pth'; did you mean 'model.path'?)"),
    ("video.height.x=1", "unknown config key 'video.height.x' ('video.height' is a setting, not a section)"),
    ("preset=wan2.1-t2v-14b", "unknown config key 'preset' (`preset: NAME` goes at the top of a config file; on the "
                              "command line name the preset with --config NAME)"),
])
def test_unknown_set_keys_say_what_is_there(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [override])
    assert str(err.value) == message


def test_unknown_keys_in_a_file_are_named_with_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("video:\n  height: 32\nsampling:\n  step: 10\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (f"{path}: unknown config key 'sampling.step' (sampling has no setting 'step'; did you "
                              f"mean 'sampling.steps'?)")
    path.write_text("nope:\n  such: 1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'nope' \('nope' is not a section; sections: model,"):
        load_config(path)
    # from_dict (the Python API's builder) says the same without a file
    with pytest.raises(ConfigError, match=r"^unknown config key 'smapling' \('smapling' is not a section; did you "
                                          r"mean 'sampling'\?\)$"):
        from_dict(OdysseyConfig, {"smapling": {}})


def test_unknown_key_on_the_command_line_is_one_line_exit_2(tmp_path):
    result = odyssey_process("config", "show", "--set", "sampling.step=10")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == ["odyssey: error: config: unknown config key 'sampling.step' (sampling has "
                                          "no setting 'step'; did you mean 'sampling.steps'?)"]


# -- 6: a config file starts from a preset -------------------------------------------------------------------------


def _expected(base: str, **changes) -> dict:
    """A preset's resolution with `changes` ({'section.key': value}) applied, as plain data."""
    data = to_dict(load_config(base))
    for key, value in changes.items():
        section, name = key.split(".")
        data[section][name] = value
    return data


def test_a_file_starts_from_the_default_preset(tmp_path):
    path = tmp_path / "steps.yaml"
    path.write_text("sampling:\n  steps: 8\nvideo:\n")  # an empty section sets nothing
    assert to_dict(load_config(path)) == _expected("tiny", **{"sampling.steps": 8})
    cfg = load_config(path)
    assert (cfg.model.path, cfg.video.height, cfg.video.width, cfg.video.frames) == (None, 32, 32, 17)


def test_a_file_names_its_preset(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("preset: wan2.1-t2v-14b\nsampling:\n  steps: 30\nmodel:\n  path: /w/14b\n")
    assert to_dict(load_config(path, ["video.height=720"])) == _expected(
        "wan2.1-t2v-14b", **{"sampling.steps": 30, "model.path": "/w/14b", "video.height": 720})


@pytest.mark.parametrize("text, message", [
    ("preset: wan\n", r"preset: unknown preset 'wan'; presets: cpu-smoke, tiny, wan2\.1-t2v-1\.3b"),
    ("preset: Wan2.1-T2V-14B\n", r"preset: unknown preset 'Wan2\.1-T2V-14B'; did you mean 'wan2\.1-t2v-14b'\? presets: "),
    ("preset: 3\n", r"preset: must be a preset name, got 3; presets: cpu-smoke, "),
    ("preset:\n", r"preset: must be a preset name, got nothing; presets: cpu-smoke, "),
    ("preset: [tiny]\n", r"preset: must be a preset name, got \['tiny'\]; presets: "),
    ("preset: ../presets/tiny\n", r"preset: unknown preset '\.\./presets/tiny'"),
])
def test_a_bad_preset_key_is_refused(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"^{path}: {message}"):
        load_config(path)


def test_presets_that_name_each_other_in_a_loop_are_refused(tmp_path, monkeypatch):
    (tmp_path / "tiny.yaml").write_text("video:\n  fps: 8\n")
    (tmp_path / "a.yaml").write_text("preset: b\n")
    (tmp_path / "b.yaml").write_text("preset: a\n")
    (tmp_path / "c.yaml").write_text("preset: tiny\nvideo:\n  fps: 12\n")
    (tmp_path / "d.yaml").write_text("video:\n  frames: 5\n")  # a preset naming none: the built-in defaults
    monkeypatch.setattr(configs.presets, "PRESETS_DIR", tmp_path)
    with pytest.raises(ConfigError, match=r"^presets name each other in a loop: a -> b -> a$"):
        load_config("a")
    assert load_config("c").video.fps == 12 and load_config("tiny").video.fps == 8
    assert (load_config("d").video.fps, load_config("d").video.frames) == (OdysseyConfig().video.fps, 5) != (8, 5)


@pytest.mark.parametrize("name", list_presets())
def test_every_shipped_preset_means_what_its_file_says(name):
    """A preset by name or by path: the built-in defaults with what its file says on top, as before presets had a
    base (the files spell out every setting they differ in from both the defaults and tiny)."""
    path = configs.presets.PRESETS_DIR / f"{name}.yaml"
    meant = from_dict(OdysseyConfig, read_yaml(path))
    assert load_config(name) == meant
    assert load_config(path) == meant
    assert load_config(str(path), ["sampling.steps=2"]).sampling.steps == 2


def test_config_show_says_what_it_resolved_from(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("sampling:\n  steps: 8\n")
    code, out, _ = odyssey_main(capsys, "config", "show", "--config", str(path), "--set", "sampling.seed=3")
    first, *rest = out.splitlines()
    assert code == 0
    assert first == (f"# resolved from preset tiny (the default: the file names none), then {path}, then --set "
                     f"sampling.seed=3")
    assert yaml.safe_load("\n".join(rest)) == _expected("tiny", **{"sampling.steps": 8, "sampling.seed": 3})

    path.write_text("preset: wan2.1-t2v-1.3b\n")
    code, out, _ = odyssey_main(capsys, "config", "show", "--config", str(path), "--explain")
    assert out.splitlines()[0] == f"# resolved from preset wan2.1-t2v-1.3b, then {path}"
    code, out, _ = odyssey_main(capsys, "config", "show", "--config", "cpu-smoke")
    assert out.splitlines()[0] == "# resolved from preset cpu-smoke"
    code, out, _ = odyssey_main(capsys, "config", "show")
    assert out.splitlines()[0] == "# resolved from preset tiny"


# -- 7: --debug adds the traceback, nothing else --------------------------------------------------------------------


@pytest.mark.parametrize("args, code, line", [
    (["config", "show", "--set", "video.frames=8"], 2, "odyssey: error: config: video: frames must be 4n+1"),
    (["config", "show", "--set", "no.such=1"], 2, "odyssey: error: config: unknown config key 'no.such'"),
    (["generate", "a cat", "-o", "cat.gif"], 2, "odyssey: error: --output must end in .mp4, got cat.gif"),
    (["generate", "a cat", "--ulysses", "0"], 2, "odyssey: error: Invalid value for '--ulysses'"),
])
def test_debug_keeps_the_exit_code(capsys, args, code, line):
    plain = odyssey_main(capsys, *args)
    debug = odyssey_main(capsys, "--debug", *args)
    assert plain[0] == debug[0] == code
    assert plain[2].splitlines() == [plain[2].splitlines()[-1]] and plain[2].splitlines()[-1].startswith(line)
    assert "Traceback (most recent call last)" in debug[2] and debug[2].splitlines()[-1] == plain[2].splitlines()[-1]


def test_debug_keeps_exit_1_of_a_runtime_failure(capsys, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("the cluster went away")

    monkeypatch.setattr(configs, "resolve", boom)
    for extra in ([], ["--debug"]):
        code, _, err = odyssey_main(capsys, *extra, "config", "show")
        assert code == 1 and err.splitlines()[-1] == "odyssey: error: RuntimeError: the cluster went away"
        assert ("Traceback" in err) == bool(extra)


def test_debug_shows_what_a_one_line_error_hid(capsys):
    _, _, err = odyssey_main(capsys, "--debug", "config", "show", "--set", "sampling.step=3")
    assert "configs.loader.ConfigError: unknown config key 'sampling.step'" in err  # the chained cause, shown


# -- 8: config presets ------------------------------------------------------------------------------------------------


def test_config_presets_lists_each_with_its_description(capsys):
    code, out, _ = odyssey_main(capsys, "config", "presets")
    lines = out.splitlines()
    assert code == 0 and len(lines) == len(list_presets())
    for name, line in zip(list_presets(), lines):
        first = (configs.presets.PRESETS_DIR / f"{name}.yaml").read_text().splitlines()[0]
        assert first.startswith("# ") and len(first) > 20
        label, description = line.split(None, 1) if name != "tiny" else line.split(" (default) ", 1)
        assert label == name and description.strip() == first[2:]
    assert [line.split()[0] for line in lines if "(default)" in line] == ["tiny"]


# -- 9: missing weights name the download command ----------------------------------------------------------------------


@pytest.mark.parametrize("name, command", [
    ("Wan2.1-T2V-1.3B", "hf download Wan-AI/Wan2.1-T2V-1.3B --local-dir {}"),
    ("Wan2.1-T2V-14B", "hf download Wan-AI/Wan2.1-T2V-14B --local-dir {}"),
    ("wan14b-diffusers", "hf download Wan-AI/Wan2.1-T2V-14B-Diffusers --local-dir {}"),
    ("my model", "hf download Wan-AI/Wan2.1-T2V-1.3B --local-dir '{}'` (or Wan-AI/Wan2.1-T2V-14B;"),
])
def test_missing_weights_name_the_download_command(tmp_path, name, command):
    from pipeline.dit import WanDiT
    from pipeline.text_encoder import WanTextEncoder
    from pipeline.vae import WanVAEDecoder
    from pipeline.weights import WeightsError

    folder = tmp_path / name
    expected = command.format(folder)
    for load in (WanDiT.from_pretrained, WanTextEncoder.from_pretrained, WanVAEDecoder.from_pretrained):
        with pytest.raises(WeightsError, match="(does|do) not exist") as err:
            load(folder)
        assert expected in str(err.value), (load, str(err.value))
    folder.mkdir()  # there, but empty: a download that never ran or was cut short
    for load, says in ((WanDiT.from_pretrained, "holds no DiT"), (WanTextEncoder.from_pretrained,
                       "holds no text encoder"), (WanVAEDecoder.from_pretrained, "holds no VAE")):
        with pytest.raises(WeightsError, match=says) as err:
            load(folder)
        assert expected in str(err.value), (load, str(err.value))


def test_cli_names_the_download_command_before_anything_runs(tmp_path):
    folder = tmp_path / "Wan2.1-T2V-14B"
    result = odyssey_process("generate", "a cat", "--config", "wan2.1-t2v-14b", "--set", f"model.path={folder}",
                             "-o", tmp_path / "cat.mp4", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"odyssey: error: model.path {folder} does not exist: download the weights with `hf download "
        f"Wan-AI/Wan2.1-T2V-14B --local-dir {folder}` (hf comes with `pip install huggingface_hub`), or set "
        f"model.path to a folder that has them"]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# -- 10: ~ in paths ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wan_home(tmp_path_factory):
    """A HOME holding a tiny Wan2.1 pipeline folder at ~/models/wan."""
    from tests.tiny_models import wan_pipeline_folder

    home = tmp_path_factory.mktemp("home")
    wan_pipeline_folder(home / "models" / "wan")
    return home


def _same_params(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_loaders_expand_home(wan_home, monkeypatch):
    from pipeline.dit import WanDiT
    from pipeline.load_guard import model_record
    from pipeline.text_encoder import WanTextEncoder
    from pipeline.vae import WanVAEDecoder
    from pipeline.vae_weights import read_vae_spec
    from pipeline.weights import load_dit, read_dit_headers

    monkeypatch.setenv("HOME", str(wan_home))
    tilde, real = "~/models/wan", wan_home / "models" / "wan"
    dit = WanDiT.from_pretrained(tilde)
    assert _same_params(dit, WanDiT.from_pretrained(real)) and _same_params(load_dit(tilde), dit)
    assert read_dit_headers(tilde)[0] == real / "transformer"
    encoder = WanTextEncoder.from_pretrained(tilde, dtype=torch.float32)
    assert _same_params(encoder.model, WanTextEncoder.from_pretrained(real, dtype=torch.float32).model)
    decoder = WanVAEDecoder.from_pretrained(tilde)
    assert _same_params(decoder, WanVAEDecoder.from_pretrained(real)) and read_vae_spec(tilde) == read_vae_spec(real)
    assert model_record(dit, tilde, encoder, decoder) == model_record(dit, str(real), encoder, decoder)


def test_config_and_cli_expand_home(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "my.yaml").write_text("sampling:\n  steps: 6\n")
    assert load_config("~/my.yaml").sampling.steps == 6 and read_yaml("~/my.yaml") == {"sampling": {"steps": 6}}
    code, out, _ = odyssey_main(capsys, "config", "show", "--config", "~/my.yaml")
    assert code == 0 and out.splitlines()[0].endswith(f"then {tmp_path / 'my.yaml'}")
    # path options and arguments: the shell leaves ~ alone in --output=~/... and in quotes
    code, _, err = odyssey_main(capsys, "generate", "a cat", "--output=~/cat.gif")
    assert code == 2 and err.strip() == f"odyssey: error: --output must end in .mp4, got {tmp_path / 'cat.gif'}"
    code, _, err = odyssey_main(capsys, "batch", "~/prompts.txt")
    assert code == 2 and str(tmp_path / "prompts.txt") in err
    code, _, err = odyssey_main(capsys, "generate", "a cat", "--preview=~/p.gif")
    assert code == 2 and err.strip() == f"odyssey: error: --preview must end in .png, got {tmp_path / 'p.gif'}"


def test_a_download_cut_short_names_the_command(wan_home, tmp_path):
    """Weight files missing from a model folder that is otherwise there (config.json, tokenizer): the DiT's and the
    text encoder's errors name the download into the model folder, not into its transformer/ or text_encoder/."""
    import shutil

    from pipeline.text_encoder import WanTextEncoder
    from pipeline.weights import WeightsError, read_dit_headers

    folder = tmp_path / "Wan2.1-T2V-1.3B"
    shutil.copytree(wan_home / "models" / "wan", folder)
    command = f"hf download Wan-AI/Wan2.1-T2V-1.3B --local-dir {folder}`"
    for weights in (folder / "transformer").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(WeightsError, match=r"^no \.safetensors weights in .*transformer") as err:
        read_dit_headers(folder)
    assert command in str(err.value)
    for weights in (folder / "text_encoder").glob("*.safetensors*"):
        weights.unlink()
    with pytest.raises(WeightsError, match=r"text_encoder") as err:
        WanTextEncoder.from_pretrained(folder)
    assert command in str(err.value)


# -- what a config file may be (review of #16) --------------------------------------------------------------------


def test_a_fifo_or_device_as_config_is_refused_at_once(tmp_path, capsys):
    """A FIFO passes click's exists/dir_okay checks; a plain open() would wait for a writer for ever."""
    import os

    fifo = tmp_path / "c.yaml"
    os.mkfifo(fifo)
    for path, kind in ((fifo, "a FIFO"), ("/dev/zero", "a device"), (tmp_path, "a folder")):
        with pytest.raises(ConfigError, match=f"^cannot read config file {path}: not a regular file \\({kind}\\)$"):
            read_yaml(path)
    result = odyssey_process("config", "show", "--config", fifo)  # its timeout (120 s) would mean it hung
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "(a FIFO)" in result.stderr, result.stderr


def test_an_overlong_config_name_is_a_config_error(capsys):
    name = "x" * 300  # past NAME_MAX: stat() fails with ENAMETOOLONG
    code, _, err = odyssey_main(capsys, "config", "show", "--config", name)
    assert code == 2 and err.count("\n") == 1 and "unknown preset 'xxx" in err, err
    code, _, err = odyssey_main(capsys, "config", "show", "--config", name + ".yaml")
    assert code == 2 and err.count("\n") == 1 and "cannot read config file" in err and "too long" in err, err


def test_a_key_given_twice_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sampling:\n  steps: 8\n  guidance_scale: 3.0\n  steps: 20\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: not valid YAML \(line 4, column 3: a key given twice \(first on "
                                          r"line 2\)\)$"):
        load_config(path)
    path.write_text("sampling: {steps: 8}\nsampling: {guidance_scale: 3.0}\n")
    with pytest.raises(ConfigError, match=r"line 2, column 1: a key given twice"):
        load_config(path)
    path.write_text("sampling: {steps: 8}\nvideo: {fps: 8}\n")  # the same field name in two sections is fine
    assert load_config(path).sampling.steps == 8
