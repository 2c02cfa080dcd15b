"""examples/tour.ipynb runs top to bottom in a real Jupyter kernel, and the stop button stops training cleanly.

The kernel is this Python (sys.executable), declared in a kernelspec written for the test, so the
notebook imports the minigpt under test. The notebook writes its files into a temporary directory.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import nbformat
import pytest
from conftest import ROOT
from jupyter_client import KernelManager
from nbclient import NotebookClient

KERNEL = "minigpt-test"


@pytest.fixture
def kernel_name(tmp_path, monkeypatch) -> str:
    """A kernelspec that runs this Python, found first on JUPYTER_PATH."""
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "minigpt test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # a tiny model: one thread is fastest on a shared machine
    return KERNEL


def test_tour_notebook_runs_top_to_bottom(kernel_name, tmp_path):
    nb = nbformat.read(ROOT / "examples" / "tour.ipynb", as_version=4)
    work = tmp_path / "work"
    work.mkdir()
    # Any cell that raises fails the run (CellExecutionError names the cell and the error).
    NotebookClient(nb, kernel_name=kernel_name, timeout=120, resources={"metadata": {"path": str(work)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream" and o.name == "stdout")
    assert "torch.Size([2, 2, 11, 11])" in text and "softmax over each row" in text and "bits/char" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the attention map, drawn inline
    assert (work / "runs" / "tour" / "best.pt").is_file()
    assert not (ROOT / "examples" / "runs").exists()
    # Run in examples/, it would leave nothing untracked: every file it wrote is one git ignores there.
    written = sorted(f"examples/{p.relative_to(work).as_posix()}" for p in work.rglob("*") if p.is_file())
    check = subprocess.run(["git", "check-ignore", "--no-index", "--stdin"], cwd=ROOT, input="\n".join(written),
                           capture_output=True, text=True)
    assert check.returncode in (0, 1), check.stderr
    assert sorted(check.stdout.split()) == written, f"not ignored by git: {set(written) - set(check.stdout.split())}"


TRAIN_LONG = """
import minigpt, pathlib
pathlib.Path("t.txt").write_text("the cat sat on the mat.\\n" * 200)
config = {"model": {"n_layer": 1, "n_head": 1, "n_embd": 16, "block_size": 16},
          "train": {"max_iters": 1000000, "eval_interval": 1000000, "warmup_iters": 1, "device": "cpu",
                    "dtype": "float32", "compile": False, "sample_chars": 0},
          "data": {"prepared_dir": "prepared"}}
minigpt.train(config, data="t.txt", out_dir="run")
"""


def test_stop_button_saves_last_pt_and_raises_a_clear_error(kernel_name, tmp_path):
    """Interrupt a long in-kernel training run as Jupyter's stop button does (SIGINT to the kernel)."""
    km = KernelManager(kernel_name=kernel_name)
    km.start_kernel(cwd=str(tmp_path))
    client = km.client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=60)
        msg_id = client.execute(TRAIN_LONG, stop_on_error=False)  # the next cell runs after the error
        stderr, error, deadline = "", None, time.monotonic() + 90
        interrupted = False
        while error is None and time.monotonic() < deadline:
            msg = client.get_iopub_msg(timeout=deadline - time.monotonic())
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream" and msg["content"]["name"] == "stderr":
                stderr += msg["content"]["text"]
            if not interrupted and "parameters" in stderr:  # training has started
                time.sleep(1.0)
                km.interrupt_kernel()
                interrupted = True
            if msg["msg_type"] == "error":
                error = msg["content"]
        assert interrupted and error is not None, stderr
        assert error["ename"] == "Interrupted"
        assert "stopped by SIGINT" in error["evalue"] and "saved" in error["evalue"] and "resume=True" in error["evalue"]
        assert (tmp_path / "run" / "last.pt").is_file()
        # The kernel lives on, with its own Ctrl-C handling back in place.
        reply_id = client.execute("import signal; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)")
        out = ""
        while True:
            msg = client.get_iopub_msg(timeout=30)
            if msg["parent_header"].get("msg_id") == reply_id:
                if msg["msg_type"] == "stream":
                    out += msg["content"]["text"]
                if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                    break
        assert out.strip() == "True"
    finally:
        client.stop_channels()
        km.shutdown_kernel(now=True)
