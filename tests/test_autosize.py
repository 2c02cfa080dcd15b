"""`auto`: the config keys it covers, the sizing rule, the measured choice, its record, resume, fine-tuning, patience."""

import math

import pytest
import yaml

from minigpt import autosize, checkpoint, config as config_mod, evaluation, sizing
from minigpt.config import ModelConfig
from minigpt.errors import ConfigError
from minigpt.model import GPT
from minigpt.training import train

from conftest import VERSE, run_cli, tiny_sets, write_corpus

AUTO = {"model": "auto", "train": {"optimizer": "muon", "warmup_iters": 2, "sample_chars": 0, "eval_iters": 2,
                                   "log_interval": 5}}


def auto_config(tmp_path, corpus, *sets, raw=None):
    return config_mod.load(raw or AUTO, tiny_sets(tmp_path, corpus) + list(sets))


# ----------------------------------------------------------------------------- config

def test_model_auto_leaves_the_shape_keys_to_the_rule_and_explicit_keys_win(tmp_path, corpus):
    cfg = auto_config(tmp_path, corpus, "model.n_layer=5", "train.learning_rate=auto")
    assert cfg.auto == ["model.n_head", "model.n_embd", "model.block_size", "model.dropout", "train.learning_rate"]
    assert cfg.model.n_layer == 5 and cfg.is_auto("model.n_embd") and not cfg.is_auto("model.n_layer")


def test_auto_where_the_rule_does_not_choose_is_refused_with_the_keys_it_can(tmp_path, corpus):
    with pytest.raises(ConfigError, match=r"model.bias must be true or false, got 'auto'"):
        auto_config(tmp_path, corpus, "model.bias=auto")
    with pytest.raises(ConfigError, match="only the model section can be auto as a whole"):
        config_mod.load({"train": "auto"})
    with pytest.raises(ConfigError, match="auto must be a list of keys among model.n_layer"):
        config_mod.load({"auto": ["train.seed"]})


def test_a_sized_config_dumps_as_plain_values_that_reload_as_the_same_run(tmp_path, corpus):
    cfg = auto_config(tmp_path, corpus, "train.max_iters=40")
    autosize.resolve(cfg, say=lambda line: None)
    assert not cfg.auto and cfg.sized["keys"][0] == "model.n_layer"
    text = config_mod.dump(cfg)
    assert "auto:" not in text and "reason:" in text
    again = config_mod.from_dict(yaml.safe_load(text))
    assert not again.auto and again.model == cfg.model and again.sized == cfg.sized


def test_overrides_carry_the_choice_to_processes_that_must_not_choose_again(tmp_path, corpus):
    cfg = auto_config(tmp_path, corpus, "train.max_iters=40")
    autosize.resolve(cfg, say=lambda line: None)
    again = config_mod.load(AUTO, tiny_sets(tmp_path, corpus) + ["train.max_iters=40"] + autosize.overrides(cfg))
    assert not again.auto and again.model == cfg.model and again.sized == cfg.sized


def test_each_torchrun_process_choosing_on_its_own_is_refused(tmp_path, corpus, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="minigpt train --nproc N, which chooses once"):
        autosize.resolve(auto_config(tmp_path, corpus))


# ----------------------------------------------------------------------------- the rule

def test_shape_params_count_what_the_model_holds():
    for layers, width in sizing.LADDER[:6]:
        shape = sizing.Shape(layers, width, sizing.heads_for(width, rope=True))
        model = GPT(ModelConfig(n_layer=layers, n_embd=width, n_head=shape.n_head, position="rope"), vocab_size=65)
        assert shape.params(65) == model.num_params(non_embedding=False)


def test_heads_divide_the_width_with_an_even_head_size_for_rope():
    assert sizing.heads_for(128, rope=True) == 4 and sizing.heads_for(384, rope=True) == 6
    for width in (96, 100, 150, 198, 250):
        heads = sizing.heads_for(width, rope=True)
        assert width % heads == 0 and (width // heads) % 2 == 0


def test_candidates_keep_explicit_keys_and_grow():
    shapes = sizing.candidates(n_layer=None, n_embd=None, n_head=None, rope=True)
    sizes = [s.params(65) for s in shapes]
    assert sizes == sorted(sizes) and len(shapes) == len(sizing.LADDER)
    deep = sizing.candidates(n_layer=8, n_embd=None, n_head=None, rope=True)
    assert {s.n_layer for s in deep} == {8}
    four = sizing.candidates(n_layer=None, n_embd=None, n_head=4, rope=True)
    assert all(s.n_head == 4 and s.n_embd % 4 == 0 for s in four) and len(four) >= 3


def test_more_tokens_choose_a_larger_model_and_more_passes_more_dropout_and_weight_decay(tmp_path, corpus):
    chosen = []
    for steps in (20, 20_000, 2_000_000):
        cfg = auto_config(tmp_path, corpus, f"train.max_iters={steps}", "train.weight_decay=auto")
        autosize.resolve(cfg, say=lambda line: None)
        chosen.append((cfg.model.n_layer * cfg.model.n_embd ** 2, cfg.model.dropout, cfg.train.weight_decay))
        assert f"weight decay {cfg.train.weight_decay:g}," in cfg.sized["reason"]
    assert chosen[0][0] < chosen[1][0] < chosen[2][0]
    assert [d for _, d, _ in chosen] == sorted(d for _, d, _ in chosen) and chosen[2][1] > 0
    assert chosen[0][2] == sizing.weight_decay_for(0) < chosen[2][2]
    assert [sizing.weight_decay_for(e) for e in (1, 3.9, 4, 8, 20)] == [0.1, 0.1, 0.3, 0.3, 0.3]
    assert [sizing.dropout_for(e) for e in (1, 8, 9, 16, 17)] == [0.0, 0.0, 0.1, 0.1, 0.2]


def test_dropout_is_decided_by_the_passes_without_it_and_timed_with_its_cost(monkeypatch):
    """12 planned passes want dropout 0.1; timed with it the shape takes half the steps (6 passes), and keeps it:
    a 10-minute run that dropped it there trained 11.9 passes without and scored 0.02 worse than 5 minutes."""
    shape = sizing.Shape(4, 192, 6)
    fast = autosize.Measured(shape, 1_800_000, 0.08, 6_000, 12_000_000)
    timed = []

    def time_shape(cfg, s, block, dropout, prepared, budget_s):
        timed.append(dropout)
        return autosize.Measured(s, fast.params, fast.step_s * 2, fast.steps // 2, fast.tokens // 2)

    monkeypatch.setattr(autosize, "time_shape", time_shape)
    chosen, dropout = autosize.with_dropout(None, fast, {shape: 128}, None, 300.0, train_chars=1_000_000)
    assert dropout == 0.1 and timed == [0.1] and chosen.step_s == fast.step_s * 2
    few = autosize.Measured(shape, 1_800_000, 0.08, 3_000, 6_000_000)  # 6 passes: no dropout, nothing timed again
    assert autosize.with_dropout(None, few, {shape: 128}, None, 300.0, train_chars=1_000_000) == (few, 0.0)
    assert timed == [0.1]


def test_evaluations_are_about_ten_unless_they_would_cost_more_than_their_share_of_the_steps():
    assert sizing.eval_interval_for(20_000, eval_iters=20) == 2_000  # ten: 133 steps' worth of 20,000
    assert sizing.eval_interval_for(1_800, eval_iters=20) == 450  # four: 10 would be 7% of the steps
    assert sizing.eval_interval_for(1_800, eval_iters=2) == 180  # cheap estimates: ten again
    assert sizing.eval_interval_for(600, eval_iters=20) == 200  # never fewer than three
    assert sizing.eval_interval_for(300, eval_iters=2) == 50  # nor closer than 50 steps (seven would be 43 apart)


def test_a_small_corpus_is_evaluated_every_pass_and_stops_when_val_stops_improving(tmp_path, corpus):
    cfg = auto_config(tmp_path, corpus, "train.max_iters=500", "train.patience=auto", "train.eval_interval=auto")
    autosize.resolve(cfg, say=lambda line: None)
    passes = int(len(VERSE) * 60 * 0.9) / (cfg.train.batch_size * cfg.model.block_size)
    assert cfg.train.patience == sizing.PATIENCE and abs(cfg.train.eval_interval - max(10, passes)) <= 1
    assert "stopping after 3 evaluations without a better val loss" in cfg.sized["reason"]


# ----------------------------------------------------------------------------- measured, recorded, resumed

def test_a_budgeted_auto_run_says_its_choice_first_records_it_and_resume_keeps_it(tmp_path, corpus, monkeypatch):
    out = tmp_path / "run"
    config = tmp_path / "auto.yaml"
    config.write_text(yaml.safe_dump(AUTO))
    sets = [s for s in tiny_sets(tmp_path, corpus)] + [f"train.out_dir={out}"]
    args = ["train", "--config", str(config), "--time", "25s"] + [a for s in sets for a in ("--set", s)]
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    first = done.stderr.splitlines()[0]
    assert first.startswith("minigpt auto: ") and " for 25s on " in first and "characters per parameter" in first
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert recorded["sized"]["reason"] in first and "auto" not in recorded
    shape = {k: recorded["model"][k] for k in ("n_layer", "n_head", "n_embd", "block_size", "dropout")}
    assert f"{shape['n_layer']} layers x {shape['n_embd']}" in first
    for name in (checkpoint.LAST, checkpoint.BEST):
        assert checkpoint.load(out / name)["config"]["sized"] == recorded["sized"]

    # Resuming measures nothing (a machine twice as fast would choose otherwise) and keeps the shape.
    monkeypatch.setattr(autosize, "measure", lambda *a, **k: pytest.fail("resume measured again"))
    cfg = config_mod.load(config, sets + ["train.time_budget=25s", "train.max_iters=10"])
    autosize.resolve(cfg, resume=True)
    assert {k: getattr(cfg.model, k) for k in shape} == shape and cfg.sized == recorded["sized"]
    resumed = run_cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "minigpt auto" not in resumed.stderr and "already complete" in resumed.stderr


def test_config_show_prints_what_train_would_choose_without_training(tmp_path, corpus):
    config = tmp_path / "auto.yaml"
    config.write_text(yaml.safe_dump(AUTO))
    args = [a for s in tiny_sets(tmp_path, corpus) for a in ("--set", s)]
    short = run_cli("config", "show", "--config", str(config), "--time", "20s", *args)
    long = run_cli("config", "show", "--config", str(config), "--time", "1h", *args)
    assert short.returncode == 0 and long.returncode == 0, short.stderr + long.stderr
    assert short.stdout.startswith("# auto: ") and " for 20s on " in short.stdout.splitlines()[0]
    small, large = (yaml.safe_load(r.stdout)["model"] for r in (short, long))
    assert small["n_layer"] * small["n_embd"] ** 2 < large["n_layer"] * large["n_embd"] ** 2
    assert not (tmp_path / "runs").exists() and not list(tmp_path.glob("**/*.pt"))


# ----------------------------------------------------------------------------- fine-tuning and patience

def test_fine_tuning_keeps_the_origin_shape_and_sizes_the_rest_from_the_new_corpus(tmp_path, corpus):
    origin = train(auto_config(tmp_path, corpus, "train.max_iters=30", "train.eval_interval=30", "train.weight_decay=0.05",
                               "model.n_layer=1", "model.n_embd=32", "model.block_size=32"), progress=False)
    small = write_corpus(tmp_path / "small.txt", repeats=8, text=VERSE)
    cfg = auto_config(tmp_path, small, "train.max_iters=30", "train.learning_rate=auto", "train.patience=auto",
                      "train.eval_interval=auto", "train.weight_decay=auto", f"train.out_dir={tmp_path / 'ft'}")
    origin_cfg = checkpoint.load(origin.run_dir)["config"]
    autosize.resolve(cfg, init_from=str(origin.run_dir), say=lambda line: None)
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.block_size) == (1, 32, 32)
    assert cfg.train.learning_rate == pytest.approx(origin_cfg["train"]["learning_rate"] * sizing.FINE_TUNE_LR_FACTOR)
    assert cfg.train.patience == sizing.PATIENCE and cfg.model.dropout == sizing.FINE_TUNE_DROPOUT
    assert cfg.train.weight_decay == 0.05  # the origin's: the rule's stronger decay would pull its weights away
    assert f"lr {cfg.train.learning_rate:g}, weight decay 0.05, dropout 0.1," in cfg.sized["reason"]
    train_chars = int(len(VERSE) * 8 * 0.9)
    assert abs(cfg.train.eval_interval - max(10, train_chars // (cfg.train.batch_size * 32))) <= 1
    assert "fine-tuning" in cfg.sized["reason"]


def test_patience_stops_when_val_stops_improving_and_best_pt_keeps_the_best(tmp_path, corpus, monkeypatch):
    losses = iter([3.0, 2.0, 2.5, 2.1, 2.2, 1.0, 1.0])  # best at the 2nd evaluation, then 3 without a better one

    def fake(*args, **kwargs):
        value = next(losses)
        return {"train": value, "val": value}

    monkeypatch.setattr(evaluation, "estimate_loss", fake)
    cfg = config_mod.load({"train": {"max_iters": 70, "eval_interval": 10, "patience": 3, "sample_chars": 0,
                                     "warmup_iters": 2}, "model": {"n_layer": 1, "n_embd": 16, "n_head": 2,
                                                                   "block_size": 16}},
                          tiny_sets(tmp_path, corpus))
    result = train(cfg, progress=False)
    assert result.step == 50 and result.best_val_loss == 2.0
    assert checkpoint.load(result.run_dir / checkpoint.BEST)["step"] == 20
    last = checkpoint.load(result.run_dir / checkpoint.LAST)
    assert last["step"] == 50 and last["evals_since_best"] == 3
    again = train(cfg, resume=True, progress=False)  # an early-stopped run is complete: nothing more is trained
    assert again.step == 50 and math.isclose(again.best_val_loss, 2.0)
