"""`minigpt view`: the page's endpoints against the Python API's numbers, the real command, and the
page itself in headless Chromium (Debian's chromium and chromedriver, driven by Selenium).

Two tiny models are trained once for the file: one on English verse, one on a mix of scripts with
characters outside the Basic Multilingual Plane, where a browser's string indices (UTF-16) and
Python's (code points) part ways.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

import minigpt
from conftest import CONFIGS, VERSE, write_corpus
from minigpt import view
from minigpt.viz import read_scalars

SCRIPTS = ("Ἐν ἀρχῇ ἦν ὁ λόγος. В начале было Слово. 太初有道，道与神同在。 في البدء كان الكلمة "
           "בְּרֵאשִׁית הָיָה הַדָּבָר 🌍🌱✨ अग्नि मीळे पुरोहितं. 😀 한국어 문장입니다. ")  # Greek, Cyrillic, Chinese, ...
BROWSER_REQUIRED = os.environ.get("MINIGPT_BROWSER_TESTS") == "required"  # .ci/run sets it: there, no skipping


def train_tiny(tmp: Path, text: str, repeats: int) -> minigpt.Model:
    corpus = write_corpus(tmp / "corpus.txt", repeats=repeats, text=text)
    config = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    overrides = {"train.max_iters": 40, "train.eval_interval": 20, "train.warmup_iters": 4, "train.eval_iters": 2,
                 "train.sample_chars": 0, "train.threads": 1, "train.log_interval": 5, "data.prepared_dir": str(tmp / "prepared")}
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            result = minigpt.train(config, overrides=overrides, data=corpus, out_dir=tmp / "run", device="cpu", progress=False)
    finally:
        torch.set_num_threads(threads)
    return minigpt.load(result.run_dir, device="cpu")


@pytest.fixture(scope="module")
def verse_model(tmp_path_factory) -> minigpt.Model:
    return train_tiny(tmp_path_factory.mktemp("verse"), VERSE, repeats=60)


@pytest.fixture(scope="module")
def scripts_model(tmp_path_factory) -> minigpt.Model:
    return train_tiny(tmp_path_factory.mktemp("scripts"), SCRIPTS, repeats=40)


@contextlib.contextmanager
def serving(model: minigpt.Model):
    """The page's server for `model` on a free port, in a thread of this process; yields its URL."""
    server = view.make_server(model, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield view.address(server)
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def verse_url(verse_model):
    with serving(verse_model) as url:
        yield url


def call(url: str, path: str, body: dict | bytes | None = None) -> tuple[int, dict | list]:
    """(status, decoded JSON) of a GET, or of a POST when there is a body; generation answers a list of lines."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url.rstrip("/") + path, data=data, method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            status, raw = response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read().decode()
    if path == "/api/generate" and status == 200:
        return status, [json.loads(line) for line in raw.splitlines()]
    return status, json.loads(raw)


# The endpoints give the Python API's numbers.

def test_read_gives_surprise_bits_and_the_expected_characters(verse_model, verse_url):
    text = "Before we proceed any further, hear me speak."
    status, got = call(verse_url, "/api/read", {"text": text})
    assert status == 200
    surprise = verse_model.surprise(text)
    assert got["chars"] == list(text) and got["bits"][0] is None and got["top"][0] == []
    assert got["bits"][1:] == pytest.approx(surprise.bits, abs=1e-5)
    for j in range(1, len(text)):
        expected = got["top"][j]
        assert len(expected) == 5 and [p for _, p in expected] == sorted((p for _, p in expected), reverse=True)
        if text[j] in dict(expected):  # the character's own probability, where it is among the five, is 2^-bits
            assert dict(expected)[text[j]] == pytest.approx(2 ** -got["bits"][j], rel=1e-4)
    # the last position's five, from explain's separate forward pass of the prefix
    after = verse_model.explain(text[:-1]).next_chars
    assert [c for c, _ in got["top"][-1]] == [c for c, _ in after]
    assert [p for _, p in got["top"][-1]] == pytest.approx([p for _, p in after], abs=1e-5)


def test_attention_is_the_models_row_for_the_clicked_character(verse_model, verse_url):
    text, position = "Before we proceed any further, hear me speak.", 40  # past block_size 32: a window
    status, got = call(verse_url, "/api/attention", {"text": text, "position": position})
    assert status == 200
    weights = verse_model.attention(text[:position + 1])  # (n_layer, n_head, T, T)
    block = verse_model.config.model.block_size
    assert got["chars"] == list(text[position + 1 - block:position + 1]) and got["start"] == position + 1 - block
    assert torch.tensor(got["weights"]) == pytest.approx(weights[:, :, -1, :], abs=1e-6)
    assert torch.tensor(got["weights"]).sum(-1) == pytest.approx(torch.ones(weights.shape[:2]), abs=1e-5)


def test_explain_gives_one_heads_steps_for_that_row(verse_model, verse_url):
    text, position = "Before we proceed", 9
    status, got = call(verse_url, "/api/explain", {"text": text, "position": position, "layer": 1, "head": 1})
    assert status == 200
    explanation = verse_model.explain(text[:position + 1], layer=1, head=1)
    assert [s["key"] for s in got["steps"]] == [s.key for s in explanation.steps]
    for key in ("q", "scores", "scaled", "weights", "head_out"):
        step = next(s for s in got["steps"] if s["key"] == key)
        assert step["values"] == pytest.approx(explanation[key][-1].tolist(), abs=1e-5), key
    assert [c for c, _ in got["next"]] == [c for c, _ in explanation.next_chars]


def test_generation_streams_the_apis_text_line_by_line(verse_model, verse_url):
    settings = {"prompt": "Before", "length": 30, "temperature": 0.9, "top_k": 10, "top_p": "", "seed": 7}
    status, lines = call(verse_url, "/api/generate", settings)
    assert status == 200 and lines[-1] == {"done": True}
    pieces = [line["piece"] for line in lines[:-1]]
    assert len(pieces) > 1  # streamed, not sent at the end in one piece
    assert "".join(pieces) == verse_model.generate("Before", max_new_tokens=30, temperature=0.9, top_k=10, seed=7,
                                                   include_prompt=False)


def test_info_exact_loss_and_curves_come_from_the_run(verse_model, verse_url):
    status, info = call(verse_url, "/api/info")
    assert status == 200
    assert info["step"] == verse_model.step and info["parameters"] == verse_model.module.num_params(non_embedding=False)
    assert info["config"]["model"]["n_layer"] == verse_model.config.model.n_layer
    status, exact = call(verse_url, "/api/exact")
    assert status == 200 and exact["loss"] == pytest.approx(verse_model.evaluate(split="val").loss, abs=1e-6)
    status, curves = call(verse_url, "/api/curves")
    assert status == 200
    expected = read_scalars(verse_model.path.parent)
    assert set(curves) == {"train/loss", "val/loss"}
    assert curves["val/loss"] == [[s, pytest.approx(v)] for s, v in expected["val/loss"]]


# Mistakes get one sentence, and the server keeps running.

@pytest.mark.parametrize("path, body, says", [
    ("/api/read", {"text": "Before Zoë"}, "not in the model's vocabulary: 'Z', 'ë'; remove them or pass unknown: skip"),
    ("/api/generate", {"prompt": "Be", "temperature": -1}, "temperature must be 0 (greedy) or positive, got -1"),
    ("/api/generate", {"prompt": "Be", "top_k": "many"}, "top_k must be a whole number, got 'many'"),
    ("/api/generate", {"prompt": "Be", "length": 10 ** 6}, "length must be 0 to 5,000 characters (what this page generates"),
    ("/api/generate", {"prompt": "Be", "length": -3}, "length must be 0 to 5,000 characters"),
    ("/api/read", {"text": "a" * 20_001}, "the text has 20,001 characters; this page reads at most 20,000"),
    ("/api/attention", {"text": "Before", "position": 6}, "position 6 is outside the text (0 to 5)"),
    ("/api/explain", {"text": "Before", "position": 2, "layer": 9, "head": 0}, "layer: 9 is out of range: this model has 2 layers"),
    ("/api/read", b"{not json", "the request is not JSON in UTF-8"),
    ("/api/read", {"unknown": "skip"}, "text is missing; fill it in"),
])
def test_a_mistake_gets_one_sentence_and_the_server_keeps_running(verse_url, path, body, says):
    status, got = call(verse_url, path, body)
    assert status == 400 and set(got) == {"error"}
    assert says in got["error"] and "\n" not in got["error"] and "Traceback" not in got["error"]
    assert call(verse_url, "/api/info")[0] == 200


def test_it_serves_its_own_page_and_nothing_else(verse_url):
    with urllib.request.urlopen(verse_url, timeout=30) as response:
        page = response.read().decode()
    assert "<title>minigpt view</title>" in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing fetched from the internet
    for path in ("/../../etc/passwd", "/web/view.js", "/best.pt", "/config.yaml"):
        assert call(verse_url, path)[0] == 404


def test_unknown_characters_can_be_skipped_and_positions_count_code_points(scripts_model):
    with serving(scripts_model) as url:
        text = "🌍🌱✨ В начале было Слово. 😀"
        status, got = call(url, "/api/read", {"text": text})
        assert status == 200 and got["chars"] == list(text)  # one entry per code point, emoji included
        position = text.index("😀")
        status, got = call(url, "/api/attention", {"text": text, "position": position})
        assert got["chars"][-1] == "😀"
        assert torch.tensor(got["weights"]) == pytest.approx(scripts_model.attention(text[:position + 1])[:, :, -1, :], abs=1e-6)
        status, got = call(url, "/api/read", {"text": "Слово Q", "unknown": "skip"})
        assert status == 200 and got["chars"] == list("Слово ")


# The real command.

def start_view(*args: str) -> tuple[subprocess.Popen, str, list[str]]:
    """`minigpt view ARGS` as a real process; (process, the page's URL, lines it printed before it)."""
    process = subprocess.Popen([sys.executable, "-m", "minigpt", "view", *args], stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = []
    for line in process.stderr:
        lines.append(line.rstrip("\n"))
        if found := re.search(r"at (http://\S+/) \(Ctrl-C to stop\)", line):
            return process, found.group(1), lines
    process.wait()
    raise AssertionError(f"minigpt view ended without serving: {lines}")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait(timeout=30)


def test_the_command_binds_loopback_and_warns_when_open_to_the_network(verse_model):
    process, url, lines = start_view("--checkpoint", str(verse_model.path.parent), "--port", "0", "--device", "cpu")
    try:
        assert url.startswith("http://127.0.0.1:") and not any("warning" in line for line in lines)
        assert call(url, "/api/info")[1]["step"] == verse_model.step
    finally:
        stop(process)
    process, url, lines = start_view("--checkpoint", str(verse_model.path.parent), "--port", "0", "--host", "0.0.0.0")
    try:
        assert any(line.startswith("warning: listening on 0.0.0.0: anyone who can reach this machine") for line in lines)
    finally:
        stop(process)


def test_ctrl_c_stops_the_server_in_one_line(verse_model):
    process, url, _ = start_view("--checkpoint", str(verse_model.path), "--port", "0")
    assert call(url, "/api/info")[0] == 200
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 130
    assert process.stderr.read().strip() == "stopped by SIGINT (Ctrl-C) while serving the page: nothing is lost (view writes no files)"


def test_a_port_in_use_is_one_line_naming_the_way_out(verse_model, verse_url):
    port = verse_url.rstrip("/").rsplit(":", 1)[1]
    result = subprocess.run([sys.executable, "-m", "minigpt", "view", "--checkpoint", str(verse_model.path), "--port", port],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr and "--port 0 for any free one" in result.stderr


def test_the_command_refuses_a_missing_checkpoint_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "minigpt", "view", "--checkpoint", str(tmp_path / "nope")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 4 and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr and "nope" in result.stderr


# The page, in a real browser.

def browser():
    """Headless Debian chromium through its chromedriver; skipped only where they are not installed and CI did not ask."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        message = "Debian's chromium and chromium-driver are not installed (scripts/install_browser.sh installs them)"
        if BROWSER_REQUIRED:
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1400,1000"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.mark.parametrize("which, prompt, click", [("verse", "Before we", 12), ("scripts", "🌍🌱✨ В", 9)])
def test_the_page_writes_shades_and_shows_where_a_head_looks(request, which, prompt, click, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    model = request.getfixturevalue(f"{which}_model")
    process, url, _ = start_view("--checkpoint", str(model.path.parent), "--port", "0", "--device", "cpu")
    driver = browser()
    started = time.monotonic()
    try:
        wait = WebDriverWait(driver, 60)
        driver.get(url)
        wait.until(lambda d: "bits/char over" in d.find_element(By.CSS_SELECTOR, '#info td[data-key="exact val"]').text)
        prompt_box = driver.find_element(By.ID, "prompt")
        prompt_box.send_keys(prompt)
        length = driver.find_element(By.ID, "length")
        length.clear()
        length.send_keys("24")
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda d: d.find_element(By.ID, "text").get_attribute("data-state") in ("done", "error"))
        assert driver.find_element(By.ID, "text").get_attribute("data-state") == "done", driver.find_element(By.ID, "message").text

        spans = driver.find_elements(By.CSS_SELECTOR, "#text .ch")
        text = "".join(span.get_attribute("textContent").replace("↵\n", "\n").replace("→\t", "\t") for span in spans)
        assert text == prompt + model.generate(prompt, max_new_tokens=24, seed=1337, include_prompt=False)
        assert len(spans) == len(list(text))  # one span per code point, emoji included
        bits = [float(span.get_attribute("data-bits")) for span in spans[1:]]
        assert bits == pytest.approx(model.surprise(text).bits, abs=1e-5)

        ActionChains(driver).move_to_element(spans[click]).perform()  # hovering shows the five expected characters
        wait.until(lambda d: d.find_element(By.ID, "tip").is_displayed())
        assert "the model expected:" in driver.find_element(By.ID, "tip").text

        spans[click].click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#heads .mini"))
        minis = driver.find_elements(By.CSS_SELECTOR, "#heads .mini")
        c = model.config.model
        assert len(minis) == c.n_layer * c.n_head
        driver.find_element(By.CSS_SELECTOR, '#heads .mini[data-layer="1"][data-head="0"]').click()
        wait.until(lambda d: d.find_element(By.ID, "explain").get_attribute("data-layer") == "1"
                   and d.find_element(By.ID, "explain").get_attribute("data-head") == "0")
        shown = [float(k.get_attribute("data-weight")) for k in driver.find_elements(By.CSS_SELECTOR, "#big .key")]
        assert shown == pytest.approx(model.attention(text[:click + 1])[1, 0, -1, :].tolist(), abs=1e-6)
        explained = driver.find_elements(By.XPATH, '//*[@id="explain"]//tr[th[text()="weights"]]//span[@data-value]')
        assert [float(e.get_attribute("data-value")) for e in explained] == pytest.approx(shown, abs=1e-6)
    finally:
        driver.quit()
        stop(process)
    print(f"browser test ({which}): {time.monotonic() - started:.1f} s")
