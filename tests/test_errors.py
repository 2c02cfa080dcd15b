"""Every bad input gets one line on stderr, a non-zero exit code, no traceback, and nothing lost."""

import random
import warnings

import pytest
import torch
from typer.testing import CliRunner

from minigpt import checkpoint
from minigpt.cli import app
from minigpt.device import available_devices
from minigpt.errors import CheckpointError, PromptError

from conftest import CONFIGS, run_cli, tiny_sets, write_corpus

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def assert_one_line_error(code, stderr, *fragments, exit_code=None):
    assert code != 0
    if exit_code is not None:
        assert code == exit_code
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("errors")
    corpus = write_corpus(tmp / "corpus.txt")
    args = ["train", "--config", str(CONFIGS / "tiny.yaml")]
    for s in tiny_sets(tmp, corpus) + ["train.max_iters=10", "train.eval_interval=10", "train.warmup_iters=2"]:
        args += ["--set", s]
    code, _, stderr = invoke(*args)
    assert code == 0, stderr
    return tmp / "run"


def train_args(tmp_path, corpus, *extra):
    args = ["train", "--config", str(CONFIGS / "tiny.yaml")]
    for s in tiny_sets(tmp_path, corpus) + list(extra):
        args += ["--set", s]
    return args


def test_config_path_missing_or_directory(tmp_path):
    code, _, err = invoke("train", "--config", str(tmp_path / "missing.yaml"))
    assert_one_line_error(code, err, "missing.yaml does not exist", exit_code=2)
    code, _, err = invoke("train", "--config", str(tmp_path))
    assert_one_line_error(code, err, str(tmp_path), "is a directory")


def test_yaml_syntax_error_and_schema_problems(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  n_layer: 2\n  n_head: [\n")
    code, _, err = invoke("train", "--config", str(bad))
    assert_one_line_error(code, err, "bad.yaml at line", "YAML syntax error")
    bad.write_text("model:\n  n_layr: 2\n  n_embd: 30\n  n_head: 4\ntrain:\n  learning_rate: fast\n")
    code, _, err = invoke("config", "show", "--config", str(bad))
    assert_one_line_error(code, err, "3 problems", "did you mean model.n_layer?", "must be a number, got 'fast'",
                          "model.n_embd (30) must be divisible by model.n_head (4)")


@pytest.mark.parametrize("kind", ["missing", "empty", "directory"])
def test_corpus_missing_empty_or_directory(tmp_path, kind):
    target = {"missing": tmp_path / "nope.txt", "empty": tmp_path / "empty.txt", "directory": tmp_path / "dir"}[kind]
    if kind == "empty":
        target.write_text("")
    if kind == "directory":
        target.mkdir()
    code, _, err = invoke(*train_args(tmp_path, target))
    assert_one_line_error(code, err, str(target), exit_code=3)


def test_corpus_not_utf8_names_byte_offset_and_errors_option_recovers(tmp_path):
    corpus = tmp_path / "latin1.txt"
    corpus.write_bytes(("Hello there, friend.\n" * 300).encode() + "café au lait\n".encode("latin-1") + b"more\n" * 300)
    offset = len(("Hello there, friend.\n" * 300).encode()) + 3
    code, _, err = invoke(*train_args(tmp_path, corpus))
    assert_one_line_error(code, err, str(corpus), f"byte at offset {offset}", "data.errors")
    code, _, err = invoke(*train_args(tmp_path, corpus, "data.errors=replace", "train.max_iters=2",
                                      "train.eval_interval=2", "train.warmup_iters=0"))
    assert code == 0, err
    assert f"note: {corpus} is not valid utf-8: 1 undecodable byte replaced by U+FFFD (data.errors=replace)" in err


@pytest.mark.parametrize("errors, done", [("replace", "replaced by U+FFFD"), ("ignore", "dropped")])
def test_errors_replace_and_ignore_say_how_many_bytes(tmp_path, errors, done):
    """`prepare` names the count of bytes data.errors replaced or dropped: here 3 separate bad bytes, then 2 more."""
    corpus = tmp_path / "bad.txt"
    text = b"Good text, line after line.\n" * 200
    corpus.write_bytes(text + b"\xff" + text + b"\xfe" + text + b"\xff")
    args = ["prepare", "--config", str(CONFIGS / "tiny.yaml"), "--set", f"data.path={corpus}",
            "--set", f"data.prepared_dir={tmp_path / 'p'}", "--set", f"data.errors={errors}"]
    code, _, err = invoke(*args)
    assert code == 0 and f"3 undecodable bytes {done} (data.errors={errors})" in err, err
    corpus.write_bytes(corpus.read_bytes() + b"\xc3\xc3" + text)  # two truncated UTF-8 sequences
    code, _, err = invoke(*args)
    assert code == 0 and f"5 undecodable bytes {done}" in err, err
    code, _, err = invoke(*args[:-2])  # strict (the default): an error instead
    assert_one_line_error(code, err, "undecodable byte at offset", exit_code=3)


def test_corpus_too_short_for_block_size(tmp_path):
    corpus = tmp_path / "short.txt"
    corpus.write_text("abcdefghij" * 20)  # 200 characters: val split has 20
    code, _, err = invoke(*train_args(tmp_path, corpus))
    assert_one_line_error(code, err, "val split", "has 20 characters", "needs at least 33")


def test_prompt_with_unknown_characters(run):
    code, _, err = invoke("sample", "--checkpoint", str(run), "--prompt", "Zebra ß", "-n", "5")
    assert_one_line_error(code, err, "'Z'", "'ß'", "'b'", "--unknown skip", exit_code=6)
    code, out, err = invoke("sample", "--checkpoint", str(run), "--prompt", "Zebra", "-n", "5", "--unknown", "skip")
    assert code == 0 and out.startswith("era")
    code, out, err = invoke("sample", "--checkpoint", str(run), "--prompt", "Zeal", "-n", "5", "--unknown", "replace")
    assert code == 0 and out.startswith(" eal")
    code, _, err = invoke("sample", "--checkpoint", str(run), "--prompt", "x", "--unknown", "maybe")
    assert_one_line_error(code, err, "--unknown must be error, skip or replace")


def test_empty_prompt_starts_from_newline(run):
    code, out, err = invoke("sample", "--checkpoint", str(run), "--prompt", "", "-n", "10")
    assert code == 0 and out.startswith("\n") and len(out) == 12


@pytest.mark.parametrize("args, fragment", [
    (["--temperature", "-1"], "--temperature must be 0 (greedy) or positive"),
    (["--top-k", "0"], "--top-k must be a positive number"),
    (["--num-samples", "0"], "--num-samples must be at least 1"),
])
def test_bad_sampling_options(run, args, fragment):
    code, _, err = invoke("sample", "--checkpoint", str(run), "--prompt", "All", *args)
    assert_one_line_error(code, err, fragment)


def test_bad_checkpoints(run, tmp_path):
    code, _, err = invoke("sample", "--checkpoint", str(tmp_path / "none.pt"))
    assert_one_line_error(code, err, "none.pt does not exist", exit_code=4)
    empty_dir = tmp_path / "emptyrun"
    empty_dir.mkdir()
    code, _, err = invoke("sample", "--checkpoint", str(empty_dir))
    assert_one_line_error(code, err, str(empty_dir), "holds no checkpoint")
    truncated = tmp_path / "truncated.pt"
    data = (run / checkpoint.LAST).read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    code, _, err = invoke("sample", "--checkpoint", str(truncated))
    assert_one_line_error(code, err, str(truncated), "truncated or not a minigpt checkpoint")
    noise = tmp_path / "noise.pt"
    noise.write_bytes(random.Random(1).randbytes(10000))
    code, _, err = invoke("sample", "--checkpoint", str(noise))
    assert_one_line_error(code, err, str(noise))


def test_any_random_bytes_are_a_checkpoint_error_without_warnings(tmp_path):
    """Garbage fails inside torch.load in many ways (a few percent of random files raised IndexError or KeyError
    and printed pickle-protocol warnings); each must become the one CheckpointError."""
    rng = random.Random(0)
    path = tmp_path / "noise.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning would be a second line on stderr
        for _ in range(300):
            path.write_bytes(rng.randbytes(rng.randint(1, 20000)))
            with pytest.raises(CheckpointError, match="cannot be read|not a minigpt checkpoint"):
                checkpoint.load(path)


def test_unavailable_device_lists_available_ones(run, tmp_path):
    missing = [device for device in ("cuda", "mps") if device not in available_devices()]
    for device in missing:
        code, _, err = invoke("sample", "--checkpoint", str(run), "--device", device)
        assert_one_line_error(code, err, f"device '{device}' is not available",
                              f"available: {', '.join(available_devices())}", exit_code=5)
    # cuda:N names a device (exit 5 where there is no such GPU), not a config mistake (exit 2).
    absent = "device 'cuda:9' does not exist" if torch.cuda.is_available() else "device 'cuda:9' is not available"
    for device, message in [("cuda", "not available")] * ("cuda" in missing) + [("cuda:9", absent)]:
        code, _, err = invoke("train", "--config", str(CONFIGS / "tiny.yaml"), "--device", device,
                              "--out-dir", str(tmp_path / "r"))
        assert_one_line_error(code, err, message, exit_code=5)


def test_unwritable_run_directory(tmp_path):
    corpus = write_corpus(tmp_path / "c.txt")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the run directory should be")
    args = train_args(tmp_path, corpus, "train.max_iters=4", "train.eval_interval=4", "train.warmup_iters=0")
    args += ["--out-dir", str(blocker / "run")]
    code, _, err = invoke(*args)
    assert_one_line_error(code, err, str(blocker / "run"))


def test_debug_flag_shows_traceback_and_keeps_the_exit_code(tmp_path):
    plain = run_cli("train", "--config", str(tmp_path / "missing.yaml"))
    result = run_cli("--debug", "train", "--config", str(tmp_path / "missing.yaml"))
    assert plain.returncode == result.returncode == 2 and "Traceback" not in plain.stderr
    assert "Traceback" in result.stderr and "ConfigError" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == plain.stderr.strip()  # the same one-line message, last


# ----------------------------------------------------------------------------- the command line itself

@pytest.mark.parametrize("args, hint", [
    (["config", "show", "--config", str(CONFIGS / "tiny.yaml"), "--set", "train.max_iters", "5"],
     "--set takes key=value as one word, e.g. --set train.max_iters=5"),
    (["bench", "--config", str(CONFIGS / "tiny.yaml"), "--json", "true"],
     "--json is a flag and takes no value: drop 'true'"),
    (["eval", "--checkpoint", "run", "--json", "false"], "--json is a flag and takes no value: drop 'false'"),
    (["train", "--config", str(CONFIGS / "tiny.yaml"), "--resume", "yes"], "--resume is a flag"),
    (["train", "--bogus"], "no such option: --bogus; see 'minigpt train --help'"),
    (["train"], "missing option '--config'"),
    (["sample", "--checkpoint", "run", "-n", "many"], "invalid value for '--max-new-tokens'"),
    (["sampel"], "no such command 'sampel'"),
])
def test_usage_errors_are_one_line_with_a_hint(args, hint):
    """Click's own errors (unknown option, stray word, missing or bad value): one line, a hint, exit code 2."""
    result = runner.invoke(app, args, prog_name="minigpt")
    assert_one_line_error(result.exit_code, result.stderr, hint, exit_code=2)
    assert result.stdout == "" and "╭" not in result.stderr


def test_help_shows_flags_as_flags():
    """Bool options read as flags (`--json  Print ...`), not as options taking a value (`--json <bool>`)."""
    for args in (["--help"], ["eval", "--help"], ["bench", "--help"], ["train", "--help"], ["sample", "--help"]):
        result = runner.invoke(app, args, prog_name="minigpt")
        assert result.exit_code == 0 and "Usage: minigpt" in result.stdout
        assert "<bool>" not in result.stdout and "╭" not in result.stdout, result.stdout
    assert any(line.split()[:2] == ["--json", "Print"] for line in runner.invoke(app, ["eval", "--help"]).stdout.splitlines())


@pytest.mark.parametrize("args", [
    ["attention", "--prompt", "All", "--out", "a.jpg"],
    ["surprise", "--text", "All", "--out", "s.txt"],
    ["eval", "--split", "test"],
    ["plot", "--out", "loss.jpg"],
    ["sample", "--prompt", "All", "--temperature", "-1"],
])
def test_option_mistakes_exit_6_with_or_without_debug(run, args):
    """A wrong option value of a command that reads a model is exit code 6 (as README says), also with --debug."""
    args = [args[0], "--run" if args[0] == "plot" else "--checkpoint", str(run), *args[1:]]
    code, _, err = invoke(*args)
    assert_one_line_error(code, err, exit_code=PromptError.exit_code)
    debug = runner.invoke(app, ["--debug", *args])
    assert debug.exit_code == PromptError.exit_code and "Traceback" in debug.stderr


def test_damaged_checkpoint_message_is_cut_at_a_word(tmp_path, monkeypatch):
    """torch's long messages are shortened for the one line, at a word boundary, never mid-word."""
    import torch as torch_mod

    words = "Weights only load failed. This file can still be loaded, to do so you have two options, do those " \
            "steps only if you trust the source of the checkpoint. In PyTorch 2.6 we changed the default"

    def fail(*args, **kwargs):
        raise RuntimeError(words + "\nSecond line of details.")

    monkeypatch.setattr(torch_mod, "load", fail)
    path = tmp_path / "x.pt"
    path.write_bytes(b"not empty")
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(path)
    shown = str(info.value).split("checkpoint (", 1)[1].rsplit(")", 1)[0]
    assert shown.endswith(" ...") and len(shown) <= 124
    kept = shown[:-4]
    assert words.startswith(kept) and words[len(kept)] == " "  # ends where a word ends


def test_options_are_flags_on_the_command_line_and_keywords_in_python():
    """The library names an option once; the CLI shows it as a flag, Python as a keyword argument."""
    from minigpt.tokenizer import CharTokenizer

    error = PromptError("pass {--unknown skip} or lower {--top-k}; {--stride 1} or {--layer 3} {--file}")
    assert str(error) == 'pass unknown="skip" or lower top_k; stride=1 or layer=3 file'
    assert error.for_cli() == "pass --unknown skip or lower --top-k; --stride 1 or --layer 3 --file"
    with pytest.raises(PromptError) as raised:
        CharTokenizer("ab").encode("abc")
    assert 'pass unknown="skip" (drop them) or unknown="replace"' in str(raised.value)
    assert "pass --unknown skip (drop them) or --unknown replace" in raised.value.for_cli()
