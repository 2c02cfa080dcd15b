"""End to end through the real command line (subprocesses), as a user runs it."""

import json
import os
import re
import shlex
import shutil
import site
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from typer.testing import CliRunner

from minigpt import api, checkpoint

from conftest import CONFIGS, ROOT, run_cli, tiny_sets, write_corpus

TAGS = {"train/loss", "val/loss", "val/bpc", "opt/lr", "opt/grad_norm", "perf/tokens_per_sec"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    corpus = write_corpus(tmp / "corpus.txt")
    args = ["train", "--config", str(CONFIGS / "tiny.yaml")]
    for s in tiny_sets(tmp, corpus):
        args += ["--set", s]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    return tmp, tmp / "run", result


def test_train_writes_checkpoints_config_and_tensorboard_scalars(trained):
    tmp, run, result = trained
    assert result.stdout == ""  # progress and summaries go to stderr
    assert "parameters" in result.stderr and "best val loss" in result.stderr and "tensorboard --logdir" in result.stderr
    assert (run / "last.pt").is_file() and (run / "best.pt").is_file() and (run / "config.yaml").is_file()
    assert "n_embd: 32" in (run / "config.yaml").read_text()
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    assert TAGS <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("val/loss")] == [30, 60]
    assert [e.step for e in acc.Scalars("train/loss")] == [10, 20, 30, 40, 50, 60]
    bpc = acc.Scalars("val/bpc")[-1].value
    assert bpc == pytest.approx(acc.Scalars("val/loss")[-1].value / 0.6931471805599453, rel=1e-5)
    assert "samples/text/text_summary" in acc.Tags()["tensors"]
    # Prepared data sits beside its vocabulary, reused by the next run.
    meta = json.loads(next((tmp / "prepared").glob("*/meta.json")).read_text())
    assert meta["vocab_size"] == len(meta["tokenizer"]["chars"]) and meta["dtype"] == "uint8"


def test_captured_log_is_plain_lines_without_carriage_returns(trained):
    """stderr captured to a file (not a terminal): step lines and evaluation lines, one per line, no bar frames."""
    _, run, result = trained
    log = result.stderr
    assert "\r" not in log
    steps = [line for line in log.splitlines() if line.startswith("step ") and "/60 (" in line]
    assert [line.split(",")[0] for line in steps] == [f"step {n}/60 ({n * 100 // 60}%)" for n in (10, 20, 30, 40, 50, 60)]
    assert all(" loss " in line and " tok/s " in line and "elapsed " in line and "ETA " in line for line in steps)
    assert [line.split(":")[0] for line in log.splitlines() if "val loss" in line and line.startswith("step")] == ["step 30", "step 60"]
    assert f"tensorboard: tensorboard --logdir {run}\n" in log  # this run only, not every run beside it


def test_sample_streams_text_from_the_vocabulary_to_stdout(trained):
    _, run, _ = trained
    result = run_cli("sample", "--checkpoint", str(run), "--prompt", "All:", "--max-new-tokens", "80", "--seed", "3")
    assert result.returncode == 0, result.stderr
    chars = set(checkpoint.load(run)["tokenizer"]["chars"])
    text = result.stdout
    assert text.startswith("All:") and len(text) == len("All:") + 80 + 1
    assert set(text) <= chars
    again = run_cli("sample", "--checkpoint", str(run), "--prompt", "All:", "--max-new-tokens", "80", "--seed", "3")
    assert again.stdout == text


def test_greedy_long_and_batched_samples(trained):
    _, run, _ = trained
    # Longer than block_size (32): the context is cropped, generation goes on.
    result = run_cli("sample", "--checkpoint", str(run), "--prompt", "", "-n", "100", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout) == 1 + 100 + 1  # newline start, 100 characters, final newline
    assert run_cli("sample", "--checkpoint", str(run), "-p", "", "-n", "100", "-t", "0").stdout == result.stdout
    batch = run_cli("sample", "--checkpoint", str(run), "-p", "All", "-n", "20", "--num-samples", "3", "--top-k", "5")
    assert batch.returncode == 0 and batch.stdout.count("\n-----\n") == 2


def test_top_k_restricts_sampling_to_the_k_most_likely_characters(trained):
    """With --top-k k every character drawn is among the model's k most likely after what came before it, even at a
    temperature that spreads the distribution; --top-k 1 leaves only the most likely one: greedy's text."""
    _, run, _ = trained
    prompt, k = "All", 3
    sampled = run_cli("sample", "--checkpoint", str(run), "-p", prompt, "-n", "25", "-t", "2", "--top-k", str(k),
                      "--seed", "5")
    assert sampled.returncode == 0, sampled.stderr
    text = sampled.stdout[:-1]  # the final newline is not sampled
    model = api.load(run, device="cpu")
    ids = model.tokenizer.encode(text)
    assert len(ids) <= model.config.model.block_size  # one forward sees every character's whole context
    with torch.no_grad():
        logits, _ = model.module(torch.tensor([ids]))  # (1, T, V)
    allowed = torch.topk(logits[0, :-1], k, dim=-1).indices  # (T - 1, k): the k most likely next ids at each position
    for position in range(len(prompt), len(ids)):
        assert ids[position] in allowed[position - 1].tolist(), (text, position)
    greedy = run_cli("sample", "--checkpoint", str(run), "-p", prompt, "-n", "25", "--temperature", "0")
    top_1 = run_cli("sample", "--checkpoint", str(run), "-p", prompt, "-n", "25", "-t", "2", "--top-k", "1", "--seed", "5")
    assert top_1.returncode == 0 and top_1.stdout == greedy.stdout


def readme_commands() -> dict[str, set[str]]:
    """The README's command table: each `minigpt COMMAND ...` row and the --options it names."""
    rows = re.findall(r"^\| `minigpt ([a-z]+(?: show)?)(.*?)` \|", (ROOT / "README.md").read_text(), re.MULTILINE)
    return {command: set(re.findall(r"--[a-z][a-z-]*", rest)) for command, rest in rows}


def test_help_lists_every_command_and_option():
    """`minigpt --help` lists exactly the README's commands; each command's --help shows every option it has
    (with its help text) and every option the README names for it."""
    from typer.main import get_command

    from minigpt.cli import app

    documented = readme_commands()
    top = run_cli("--help")
    assert top.returncode == 0
    listed = set(re.findall(r"^  ([a-z]+) ", top.stdout.split("Commands:")[1], re.MULTILINE))
    assert listed == {command.split()[0] for command in documented}, (listed, documented)
    assert len(documented) == 12
    group = get_command(app)
    runner = CliRunner()
    for command, options in documented.items():
        words = command.split()
        cmd = group.commands[words[0]]
        for word in words[1:]:
            cmd = cmd.commands[word]
        shown = runner.invoke(app, [*words, "--help"], prog_name="minigpt")
        assert shown.exit_code == 0, shown.output
        declared = {opt for param in cmd.params for opt in param.opts if opt.startswith("--")}
        assert options <= declared, f"README names options `{command}` does not have: {options - declared}"
        for param in cmd.params:
            assert param.help, f"{command} {param.opts} has no help text"
            for opt in param.opts:
                assert re.search(rf"(^|[ ,]){re.escape(opt)}\b", shown.stdout, re.MULTILINE), f"{command} --help lacks {opt}"
    console_script = Path(sys.executable).parent / "minigpt"
    assert subprocess.run([str(console_script), "--help"], capture_output=True, text=True).returncode == 0


def test_version_prints_the_package_version():
    import minigpt

    done = run_cli("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"minigpt {minigpt.__version__}\n" and done.stderr == ""


def test_every_shown_default_is_readable():
    """No `[default:  ]` (a newline or blanks shown as nothing): every default a --help shows has visible text."""
    from typer.main import get_command

    from minigpt.cli import app

    group = get_command(app)
    commands = [([name], cmd) for name, cmd in group.commands.items() if not hasattr(cmd, "commands")]
    commands += [([name, sub], c) for name, cmd in group.commands.items() for sub, c in getattr(cmd, "commands", {}).items()]
    runner = CliRunner()
    for words, _ in commands:
        shown = runner.invoke(app, [*words, "--help"], prog_name="minigpt", terminal_width=400)
        assert shown.exit_code == 0, shown.output
        defaults = re.findall(r"\[default: (.*?)\]", shown.stdout, re.DOTALL)
        blank = [d for d in defaults if not d.strip() or not d.isprintable()]
        assert not blank, f"minigpt {' '.join(words)} --help shows unreadable defaults {blank!r}"
    sample_help = runner.invoke(app, ["sample", "--help"], prog_name="minigpt", terminal_width=400).stdout
    assert "[default: (a newline)]" in sample_help


@pytest.mark.parametrize("given, shown", [("5", "5s"), ("90.5", "90.5s"), ("5m", "5m"), ("1.5h", "1.5h")])
def test_the_first_line_shows_the_time_budget_as_given(tmp_path, capsys, given, shown):
    from minigpt import budget
    from minigpt.config import load
    from minigpt.distributed import current_world
    from minigpt.run import start_run
    from minigpt.training import open_progress

    corpus = write_corpus(tmp_path / "c.txt")
    cfg = load(CONFIGS / "tiny.yaml", tiny_sets(tmp_path, corpus) + [f"train.time_budget={given}"])
    run = start_run(cfg, current_world("cpu", cfg.train.batch_size))
    try:
        open_progress(run, progress=False, measured=budget.Costs(elapsed_s=1.0, step_s=0.01, eval_s=0.5))
    finally:
        run.close()
    first = [line for line in capsys.readouterr().err.splitlines() if line.startswith("minigpt:")][0]
    assert f"(time budget {shown}: 10.0 ms/step" in first, first


def test_closed_stdout_is_a_normal_end(trained):
    """`minigpt sample ... | head -c 100` under pipefail: sample stops promptly and exits 0 without a word."""
    _, run, _ = trained
    command = (f"{shlex.quote(sys.executable)} -m minigpt sample --checkpoint {shlex.quote(str(run))} -n 20000 "
               "--no-cache | head -c 100")
    start = time.monotonic()
    result = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout) == 100 and result.stderr == ""
    assert time.monotonic() - start < 60  # 20,000 uncached characters would take minutes: it stopped at the pipe


def test_demo_installs_the_plot_extra(tmp_path):
    """scripts/demo.sh installs what its TensorBoard shows: the `plot` extra (matplotlib) for attention images.

    Real pip runs demo.sh's install step, offline: the environment it installs into (a fresh venv) already
    has everything this one has except matplotlib and minigpt, and the only "index" is a local folder with a
    stand-in matplotlib wheel. So matplotlib is importable afterwards only if the install asked for the extra.
    """
    project = tmp_path / "project"  # a copy, so that the editable install writes nothing into the repository
    for name in ("scripts", "minigpt"):
        shutil.copytree(ROOT / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, project / name)
    installed = tmp_path / "installed"  # this environment's packages, less matplotlib and minigpt
    installed.mkdir()
    for site_dir in site.getsitepackages():
        for entry in Path(site_dir).iterdir():
            skip = (entry.name == "matplotlib" or entry.name.startswith(("matplotlib-", "minigpt"))
                    or "__editable__" in entry.name or entry.suffix == ".pth")
            if not skip and not (installed / entry.name).exists():
                (installed / entry.name).symlink_to(entry)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    next((venv / "lib").glob("python*/site-packages")).joinpath("installed.pth").write_text(f"{installed}\n")
    index = tmp_path / "index"
    index.mkdir()
    with zipfile.ZipFile(index / "matplotlib-3.7.0-py3-none-any.whl", "w") as wheel:
        info = "matplotlib-3.7.0.dist-info/"
        files = {"matplotlib/__init__.py": "",
                 info + "METADATA": "Metadata-Version: 2.1\nName: matplotlib\nVersion: 3.7.0\n",
                 info + "WHEEL": "Wheel-Version: 1.0\nGenerator: minigpt-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
        files[info + "RECORD"] = "".join(f"{name},,\n" for name in [*files, info + "RECORD"])
        for name, text in files.items():
            wheel.writestr(name, text)
    calls = tmp_path / "calls.txt"
    stubs = tmp_path / "stubs"  # `minigpt` records its arguments instead of training
    stubs.mkdir()
    (stubs / "minigpt").write_text(f'#!/usr/bin/env bash\necho "minigpt $*" >> {shlex.quote(str(calls))}\n')
    (stubs / "minigpt").chmod(0o755)
    env = {**os.environ, "VIRTUAL_ENV": str(venv), "PATH": f"{stubs}:{venv / 'bin'}:{os.environ['PATH']}",
           "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(index), "PIP_CONFIG_FILE": os.devnull,
           "PIP_NO_BUILD_ISOLATION": "0"}  # (pip reads this variable inverted: 0 turns isolation off)
    env.pop("PYTHONPATH", None)
    result = subprocess.run(["bash", str(project / "scripts" / "demo.sh"), str(tmp_path / "none.yaml")],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    imported = subprocess.run([str(venv / "bin" / "python"), "-c", "import matplotlib, minigpt; print(matplotlib.__file__)"],
                              env=env, capture_output=True, text=True, timeout=60)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.startswith(str(venv))  # the stand-in, installed into the environment demo.sh used
    assert calls.read_text().startswith(f"minigpt train --config {tmp_path / 'none.yaml'}")


def test_config_show_prints_resolved_yaml(tmp_path):
    result = run_cli("config", "show", "--config", str(CONFIGS / "tiny.yaml"), "--set", "train.learning_rate=5e-4")
    assert result.returncode == 0
    assert "learning_rate: 0.0005" in result.stdout and "n_layer: 2" in result.stdout and "beta1: 0.9" in result.stdout


def test_prepare_command_reports_and_reuses(tmp_path):
    corpus = write_corpus(tmp_path / "c.txt")
    args = ["prepare", "--config", str(CONFIGS / "tiny.yaml"), "--set", f"data.path={corpus}",
            "--set", f"data.prepared_dir={tmp_path / 'p'}"]
    first = run_cli(*args)
    assert first.returncode == 0 and "vocabulary" in first.stderr
    bin_file = next((tmp_path / "p").glob("*/train.bin"))
    mtime = bin_file.stat().st_mtime_ns
    assert run_cli(*args).returncode == 0 and bin_file.stat().st_mtime_ns == mtime  # reused
    corpus.write_text(corpus.read_text() + "More text here, with new letters: XYZ.\n")
    assert run_cli(*args).returncode == 0 and bin_file.stat().st_mtime_ns != mtime  # rebuilt


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tensorboard_server_serves_val_loss(trained):
    _, run, _ = trained
    port = free_port()
    tb = Path(sys.executable).parent / "tensorboard"
    server = subprocess.Popen([str(tb), "--logdir", str(run), "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/data/plugin/scalars/scalars?tag=val%2Floss&run=."
        deadline, series = time.time() + 90, None
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    series = json.loads(response.read())
                if series:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(1)
        assert series, "TensorBoard did not serve val/loss"
        acc = EventAccumulator(str(run))
        acc.Reload()
        assert [(s, pytest.approx(v)) for _, s, v in series] == [(e.step, e.value) for e in acc.Scalars("val/loss")]
    finally:
        server.terminate()
        server.wait(timeout=30)
