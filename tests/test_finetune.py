"""Fine-tuning (`--init-from`): extended vocabulary, old logits kept, better than scratch, exact resume, shape refusal."""

import pytest
import torch
from typer.testing import CliRunner

from minigpt import checkpoint
from minigpt.cli import app
from minigpt.distributed import World
from minigpt.model import GPT
from minigpt.run import start_run
from minigpt.checkpoint import load_model
from minigpt.training import train

from conftest import CONFIGS, tiny_config, tiny_sets, write_corpus

FAST = ["train.warmup_iters=2", "train.sample_chars=0", "train.eval_iters=4"]
# Corpus B: other English text, with characters corpus A (conftest.VERSE) never had.
LETTER = ("Dear Marguerite,\nThe café on Rue Lepic opens at 7:30 now; I'll meet you there at 8 (bring the map!).\n"
          "We could walk to the old mill after lunch, if the weather holds.\nYours, Jérôme\n\n")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny model trained on corpus A (the Shakespeare lines of conftest)."""
    tmp = tmp_path_factory.mktemp("pre")
    a = write_corpus(tmp / "a.txt")
    return train(tiny_config(tmp, a, "train.max_iters=100", "train.eval_interval=100", *FAST), progress=False)


def test_extended_vocabulary_keeps_old_ids_and_the_logits_of_old_text(tmp_path, pretrained):
    b = write_corpus(tmp_path / "b.txt", text=LETTER)
    cfg = tiny_config(tmp_path, b, *FAST)
    run = start_run(cfg, World(device=torch.device("cpu")), init_from_path=str(pretrained.run_dir))
    try:
        old = load_model(str(pretrained.run_dir), torch.device("cpu"))
        chars = old.tokenizer.chars
        assert run.tokenizer.chars[:len(chars)] == chars  # every old character keeps its id
        new = run.tokenizer.chars[len(chars):]
        assert new == sorted(set(LETTER) - set(chars)) and "é" in new  # new ones appended ...
        assert set(chars) - set(LETTER)  # ... and characters B lacks (here '?', 'F', ...) stay
        text = "All:\nSpeak, speak.\nYou are all"  # 29 characters: within block_size 32
        ids = old.tokenizer.encode(text)
        assert run.tokenizer.encode(text) == ids
        run.model.eval()
        with torch.no_grad():
            new_logits, _ = run.model(torch.tensor([ids]))
            old_logits, _ = old.model(torch.tensor([ids]))
        assert torch.allclose(new_logits[..., :len(chars)], old_logits, atol=1e-5, rtol=0)
        # The new characters' rows are those a fresh model of this config starts training with.
        torch.manual_seed(cfg.train.seed)
        fresh = GPT(cfg.model, run.tokenizer.vocab_size)
        assert torch.equal(run.model.lm_head.weight[len(chars):], fresh.lm_head.weight[len(chars):])
        assert run.step == 0 and not run.optimizer.state and run.init_from["step"] == pretrained.step
    finally:
        run.close()


def test_finetuned_model_beats_the_same_steps_from_scratch_and_resumes_exactly(tmp_path, pretrained):
    b = write_corpus(tmp_path / "b.txt", text=LETTER)
    steps = ["train.max_iters=20", "train.eval_interval=10", "train.lr_decay_iters=20", *FAST]
    scratch = train(tiny_config(tmp_path / "scratch", b, *steps), progress=False)
    tuned = train(tiny_config(tmp_path / "tuned", b, *steps), progress=False, init_from=str(pretrained.run_dir))
    # Same corpus, same held-out text and evaluation batches, same seed and steps.
    assert tuned.history[-1]["val_loss"] < scratch.history[-1]["val_loss"]
    # A fine-tuned run is resumed like any other: 10 steps, stop, resume to 20 equals 20 straight.
    half = tiny_config(tmp_path / "half", b, *steps[1:], "train.max_iters=10")
    train(half, progress=False, init_from=str(pretrained.run_dir))
    resumed = train(tiny_config(tmp_path / "half", b, *steps), progress=False, resume=True)
    a, r = checkpoint.load(tuned.run_dir, prefer=checkpoint.LAST), checkpoint.load(resumed.run_dir, prefer=checkpoint.LAST)
    assert all(torch.equal(a["model"][k], r["model"][k]) for k in a["model"]) and r["step"] == 20
    assert a["tokenizer"] == r["tokenizer"] and a["init_from"] == r["init_from"]
    assert a["init_from"]["checkpoint"] == str(pretrained.run_dir / checkpoint.BEST)
    # `info` says where the weights came from; `eval --split` finds the fine-tuned run's own token ids.
    info = CliRunner().invoke(app, ["info", "--checkpoint", str(tuned.run_dir)])
    assert info.exit_code == 0 and f"init_from:\n  checkpoint: {pretrained.run_dir / checkpoint.BEST}" in info.output
    assert f"  step: {pretrained.step}" in info.output
    split = CliRunner().invoke(app, ["eval", "--checkpoint", str(tuned.run_dir), "--split", "val", "--json"])
    assert split.exit_code == 0, split.output


def test_init_from_refuses_another_model_shape_or_a_resume(tmp_path, pretrained):
    b = write_corpus(tmp_path / "b.txt", text=LETTER)
    args = ["train", "--config", str(CONFIGS / "tiny.yaml"), "--init-from", str(pretrained.run_dir)]
    for s in tiny_sets(tmp_path, b):
        args += ["--set", s]
    wider = CliRunner().invoke(app, [*args, "--set", "model.n_embd=64", "--set", "model.n_head=4"])
    assert wider.exit_code == 4
    assert wider.output.count("\n") == 1 and "the model shape differs (model.n_embd 32 -> 64, model.n_head 2 -> 4)" in wider.output
    assert CliRunner().invoke(app, [*args, "--resume"]).exit_code == 2
