from pathlib import Path

import pytest
import yaml

from minigpt import config
from minigpt.errors import ConfigError

from conftest import CONFIGS


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_loads_and_round_trips(path: Path):
    cfg = config.load(path)
    assert cfg.name == path.stem
    again = config.from_dict(yaml.safe_load(config.dump(cfg)), name=cfg.name)
    assert again == cfg


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_unknown_key_names_file_key_and_suggestion(tmp_path):
    p = write(tmp_path, "train:\n  learning_rat: 0.1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*train\.learning_rat.*did you mean train\.learning_rate\?"):
        config.load(p)


def test_unknown_section_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="unknown section 'trian'.*did you mean train"):
        config.load(write(tmp_path, "trian:\n  max_iters: 3\n"))


def test_all_problems_reported_together(tmp_path):
    p = write(tmp_path, "model:\n  n_layer: two\n  n_embd: 100\n  n_head: 3\n  bogus: 1\ntrain:\n  max_iters: 1.5\n")
    with pytest.raises(ConfigError) as info:
        config.load(p)
    msg = str(info.value)
    assert "4 problems" in msg
    assert "model.n_embd (100) must be divisible by model.n_head (3)" in msg
    assert "model.n_layer must be an integer, got 'two'" in msg
    assert "unknown key model.bogus" in msg
    assert "train.max_iters must be an integer, got 1.5" in msg


@pytest.mark.parametrize("text, expected", [
    ("model:\n  n_embd: 100\n  n_head: 3\n", "model.n_embd (100) must be divisible by model.n_head (3)"),
    ("model:\n  n_embd: 36\n  n_head: 4\n  position: rope\n", "the head size model.n_embd / model.n_head (9) must be even"),
    ("model:\n  position: sinusoidal\n", "model.position must be one of learned, rope"),
    ("train:\n  warmup_iters: 50\n  max_iters: 10\n", "train.warmup_iters (50) must not exceed train.max_iters (10)"),
    ("data:\n  val_fraction: 1.5\n", "data.val_fraction must be in (0, 1)"),
    ("model:\n  block_size: 0\n", "model.block_size must be positive"),
    ("data:\n  errors: maybe\n", "data.errors must be one of strict, replace, ignore"),
    ("train:\n  device: tpu\n", "train.device must be auto, cpu, cuda, cuda:N or mps, got 'tpu'"),
    ("train:\n  device: cuda:x\n", "train.device must be auto, cpu, cuda, cuda:N or mps, got 'cuda:x'"),
    ("data:\n  encoding: klingon-8\n", "unknown text encoding"),
])
def test_impossible_values(tmp_path, text, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        config.load(write(tmp_path, text))


def test_overrides_are_typed_and_validated(tmp_path):
    p = write(tmp_path, "train:\n  max_iters: 300\n")
    cfg = config.load(p, ["train.learning_rate=3e-4", "model.dropout=0.1", "train.compile=false", "data.path=x.txt"])
    assert cfg.train.learning_rate == 3e-4 and cfg.model.dropout == 0.1 and cfg.train.compile is False
    assert cfg.data.path == "x.txt" and cfg.train.max_iters == 300
    with pytest.raises(ConfigError, match="did you mean train.max_iters"):
        config.load(p, ["train.max_iter=5"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        config.load(p, ["train.max_iters"])
    with pytest.raises(ConfigError, match="train.batch_size must be an integer"):
        config.load(p, ["train.batch_size=big"])


def test_yaml_syntax_error_names_line(tmp_path):
    with pytest.raises(ConfigError, match=r"c\.yaml at line 3, column 1: YAML syntax error"):
        config.load(write(tmp_path, "train:\n  max_iters: 3\n\tbad: 1\n"))


def test_missing_and_directory_paths(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml does not exist"):
        config.load(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is a directory"):
        config.load(tmp_path)


def test_run_dir_defaults_to_config_name(tmp_path):
    cfg = config.load(write(tmp_path, "train:\n  max_iters: 300\n"))
    assert cfg.run_dir() == Path("runs") / "c"
    assert config.load(write(tmp_path, ""), ["train.out_dir=elsewhere"]).run_dir() == Path("elsewhere")


def test_device_may_name_one_gpu(tmp_path):
    """--device cuda:1 (as --help offers) is a valid train.device; torchrun's processes refuse it by name."""
    from minigpt import distributed
    from minigpt.errors import DeviceError

    p = write(tmp_path, "train:\n  device: cuda:1\n")
    assert config.load(p).train.device == "cuda:1"
    assert config.load(p, ["train.device=cuda:0"]).train.device == "cuda:0"
    with pytest.raises(DeviceError, match="names one GPU"):  # distributed.py's cuda:N branch, reached from a config
        distributed.process_device(config.load(p).train.device, 0)
