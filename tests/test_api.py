"""The Python API: it trains and loads like the CLI, and the CLI's commands print what it returns.

One tiny model is trained once for the whole file, through `minigpt.train` with a dict config.
"""

from __future__ import annotations

import contextlib
import io
import json
import shlex
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import CONFIGS, run_cli, write_corpus
from typer.testing import CliRunner

import minigpt
from minigpt.cli import app
from minigpt.errors import ConfigError, PromptError


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(TrainResult, stderr of training, corpus) of a 12-step run made with minigpt.train."""
    tmp = tmp_path_factory.mktemp("api")
    corpus = write_corpus(tmp / "corpus.txt")
    config = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    overrides = {"train.max_iters": 12, "train.eval_interval": 6, "train.warmup_iters": 2, "train.eval_iters": 2,
                 "train.sample_chars": 0, "train.threads": 1, "data.prepared_dir": str(tmp / "prepared")}
    stderr = io.StringIO()
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stderr(stderr):
            result = minigpt.train(config, overrides=overrides, data=corpus, out_dir=tmp / "run", device="cpu",
                                   progress=False)
    finally:
        torch.set_num_threads(threads)
    return result, stderr.getvalue(), corpus


@pytest.fixture(scope="module")
def model(trained):
    return minigpt.load(trained[0].run_dir, device="cpu")


def cli(*args: str) -> subprocess.CompletedProcess:
    """The CLI in this process (Typer's runner): the same code path as the console script, without a new interpreter."""
    result = CliRunner().invoke(app, list(args))
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def real_cli(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
    """The CLI as a real subprocess, reading `input` from its stdin."""
    return run_cli(*args, env={"OMP_NUM_THREADS": "1"}, input=input)


def test_import_is_light_and_train_stays_the_api_function():
    code = ("import sys, minigpt, minigpt.cli; assert 'torch' not in sys.modules, 'torch imported'; "
            "import minigpt.training  # the training loop's module has its own name\n"
            "assert minigpt.train is minigpt.api.train; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "ok", done.stderr


def test_public_names_have_docstrings_and_type_hints():
    import inspect

    for name in minigpt.__all__:
        obj = getattr(minigpt, name)
        assert obj.__doc__, name
    for name, member in inspect.getmembers(minigpt.Model):
        if not name.startswith("_"):
            assert member.__doc__, name
            if inspect.isfunction(member):
                assert "return" in member.__annotations__, name


def test_config_from_a_path_a_dict_or_a_config_resolve_alike(tmp_path):
    path = CONFIGS / "tiny.yaml"
    from_path = minigpt.resolve_config(path, ["train.max_iters=70", "train.learning_rate=1e-3"], data="x.txt")
    from_dict = minigpt.resolve_config(yaml.safe_load(path.read_text()),
                                       {"train.max_iters": 70, "train.learning_rate": 1e-3}, data="x.txt")
    from_config = minigpt.resolve_config(from_path)
    assert from_path.model == from_dict.model == from_config.model
    assert from_path.train == from_dict.train == from_config.train and from_path.data.path == "x.txt"
    # The same validator as a config file: every problem at once, typos with the closest key.
    with pytest.raises(ConfigError, match=r"2 problems.*learning_rate must be a number.*did you mean train\.max_iters"):
        minigpt.resolve_config(path, {"train.max_iter": 5, "train.learning_rate": "fast"})
    with pytest.raises(ConfigError, match="must be a YAML file path, a dict or a minigpt Config"):
        minigpt.resolve_config(42)


def test_train_returns_the_run_and_prints_a_hint_from_its_validation_text(trained, model):
    result, stderr, corpus = trained
    assert result.step == 12 == model.step and [h["step"] for h in result.history] == [6, 12]
    assert result.best_val_loss == min(h["val_loss"] for h in result.history) == pytest.approx(model.best_val_loss)
    hint = next(line for line in stderr.splitlines() if "sample:" in line)
    args = shlex.split(hint.split("sample:", 1)[1])
    assert args[:4] == ["minigpt", "sample", "--checkpoint", str(result.run_dir)] and args[4] == "--prompt"
    text = corpus.read_text()
    val = text[int(len(text) * 0.9):]  # data.val_fraction 0.1: the corpus's tail
    assert args[5] and args[5] in val[:256] and args[5] != "ROMEO:"


def test_history_time_is_seconds_since_the_run_started(tmp_path):
    """TrainResult.history[i]["time_s"]: seconds from the start of this training, not a raw perf_counter value."""
    import time

    corpus = write_corpus(tmp_path / "c.txt")
    overrides = {"train.max_iters": 4, "train.eval_interval": 2, "train.warmup_iters": 1, "train.eval_iters": 1,
                 "train.sample_chars": 0, "train.threads": 1, "data.prepared_dir": str(tmp_path / "prepared")}
    threads = torch.get_num_threads()
    before = time.perf_counter()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            result = minigpt.train(CONFIGS / "tiny.yaml", overrides=overrides, data=corpus, out_dir=tmp_path / "run",
                                   device="cpu", progress=False)
    finally:
        torch.set_num_threads(threads)
    took = time.perf_counter() - before
    times = [h["time_s"] for h in result.history]
    assert len(times) == 2 and 0 <= times[0] <= times[1] <= took, (times, took)


def test_model_attributes(model, trained):
    assert isinstance(model.module, torch.nn.Module) and not model.module.training
    assert model.config.model.n_layer == 2 and model.path == trained[0].run_dir / "best.pt"
    assert model.vocab == "".join(sorted(set(trained[2].read_text()))) and model.device == torch.device("cpu")
    assert "step 12" in repr(model)


def test_generate_and_stream_are_what_the_cli_prints(model, trained):
    run = str(trained[0].run_dir)
    options = dict(max_new_tokens=60, temperature=0.9, top_k=10, top_p=0.9, seed=4)
    text = model.generate("All:", **options)
    assert "".join(model.stream("All:", **options)) == text
    assert model.generate("All:", include_prompt=False, **options) == text[len("All:"):]
    done = cli("sample", "--checkpoint", run, "--prompt", "All:", "-n", "60", "-t", "0.9", "--top-k", "10",
               "--top-p", "0.9", "--seed", "4")
    assert done.returncode == 0, done.stderr
    assert done.stdout == text + "\n"
    batch = model.generate_many("All:", 3, max_new_tokens=20, seed=2)
    assert len(batch) == 3 and all(t.startswith("All:") and len(t) == 24 for t in batch)


def test_stop_ends_before_the_stop_string_in_the_api_and_the_cli(model, trained):
    full = model.generate("Speak", 80, temperature=1.0, seed=9, include_prompt=False)
    stop = full[30:32]
    expected = "Speak" + full[:full.index(stop)]
    assert model.generate("Speak", 80, temperature=1.0, seed=9, stop=stop) == expected
    assert model.generate("Speak", 80, temperature=1.0, seed=9, stop=["zzz", stop]) == expected
    done = cli("sample", "--checkpoint", str(trained[0].run_dir), "-p", "Speak", "-n", "80", "-t", "1", "--seed", "9",
               "--stop", "zzz", "--stop", stop)
    assert done.returncode == 0 and done.stdout == expected + "\n"


def test_attention_tensor_matches_the_maps_the_cli_draws(model):
    weights = model.attention("All:\nSpeak")
    assert weights.shape == (2, 2, 10, 10)
    maps = model.attention_maps("All:\nSpeak", layer=1, head=0)
    torch.testing.assert_close(weights[1, 0], torch.from_numpy(maps.maps[(1, 0)]))
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, 10))


def test_evaluate_and_surprise_agree_on_text_and_file(model, tmp_path):
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 2
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    on_text, on_file = model.evaluate(text), model.evaluate(file=path)
    assert on_text.characters == on_file.characters == len(text) - 1
    assert on_text.bpc == pytest.approx(on_file.bpc) == pytest.approx(model.surprise(text).mean_bits)
    assert model.surprise(file=path).bits == pytest.approx(model.surprise(text).bits)
    assert model.evaluate().source == "val split"
    with pytest.raises(PromptError, match="one of"):
        model.evaluate(text, split="val")
    with pytest.raises(PromptError, match="unknown must be error, skip or replace"):
        model.surprise(text, unknown="ignore")


def test_cli_explain_prints_what_the_api_returns(model, trained):
    run = str(trained[0].run_dir)
    done = cli("explain", "--checkpoint", run, "--prompt", "All:\nSpeak", "--layer", "1", "--head", "1", "--json")
    assert done.returncode == 0, done.stderr
    expected = json.loads(json.dumps(model.explain("All:\nSpeak", layer=1, head=1).to_dict()))
    got = json.loads(done.stdout)
    assert got.keys() == expected.keys() and [c["char"] for c in got["next"]] == [c["char"] for c in expected["next"]]
    assert [s["key"] for s in got["steps"]] == [s["key"] for s in expected["steps"]]
    for a, b in zip(got["steps"], expected["steps"]):  # the same numbers, up to float rounding (threads differ)
        x, y = (torch.tensor([[float("-inf") if v is None else v for v in row] for row in s["values"]]) for s in (a, b))
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
    text = cli("explain", "--checkpoint", run, "--prompt", "All:")
    assert text.returncode == 0 and text.stdout.startswith("explain: layer 0, head 0 of 2, on 4 characters")
    assert "softmax over each row" in text.stdout and "next character after ':'" in text.stdout
    bad = cli("explain", "--checkpoint", run, "--prompt", "All", "--head", "2")
    assert bad.returncode == PromptError.exit_code and bad.stderr.startswith("error: --head 2 is out of range")


def test_interactive_session_through_a_real_subprocess(model, trained):
    """Two turns then an empty line; a line with unknown characters is refused and the session goes on."""
    run = str(trained[0].run_dir)
    options = dict(max_new_tokens=30, temperature=0.8, seed=11)
    done = real_cli("sample", "--checkpoint", run, "--interactive", "-n", "30", "--seed", "11",
               input="All:\nSpeak~\nFirst\n\nnever read\n")
    assert done.returncode == 0, done.stderr
    chat = model.conversation(**options)
    first = "".join(chat.reply("All:"))
    second = "".join(chat.reply("First"))
    assert done.stdout == first + "\n" + second + "\n"  # the line after the empty one is never read
    assert "error: 1 character(s) not in the model's vocabulary: '~'" in done.stderr
    # Ctrl-D (end of input) ends the session too.
    eof = real_cli("sample", "--checkpoint", run, "-i", "-n", "5", input="All:")
    assert eof.returncode == 0 and len(eof.stdout) == 5 + 1


def test_conversation_keeps_block_size_characters_of_context(model):
    chat = model.conversation(max_new_tokens=40, temperature=0.0)
    replies = ["".join(chat.reply(line)) for line in ("All:", "Speak", "First")]
    assert all(len(r) == 40 for r in replies) and len(chat.text) == model.config.model.block_size
    # The third reply continued the conversation's last block_size characters.
    context = ("All:" + replies[0] + "\nSpeak" + replies[1] + "\nFirst")[-model.config.model.block_size:]
    assert replies[2] == model.generate(context, 40, temperature=0.0, include_prompt=False)
