import json
import os
import subprocess
import sys

import pytest

import fjt
from conftest import ROOT

CONFIG = os.path.join(ROOT, "configs", "digits_mlp.py")


def run_train(*args, cwd=ROOT):
  return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "train.py"), *args],
                        capture_output=True, text=True, cwd=cwd, timeout=300)


def test_overrides_parse_to_the_existing_types():
  config = fjt.apply_overrides(fjt.load_config(CONFIG), [
      "train.steps=7", "optimizer.learning_rate=1", "model.features=(3, 4)", "optimizer.nesterov=false",
      "optimizer.name=adam", "model.features=5"])
  assert config.train.steps == 7
  assert config.optimizer.learning_rate == 1.0 and isinstance(config.optimizer.learning_rate, float)
  assert config.model.features == (5,) and config.optimizer.nesterov is False
  assert config.optimizer.name == "adam"


def test_config_files_may_leave_out_the_run_defaults(tmp_path):
  path = tmp_path / "short.py"
  path.write_text("import ml_collections\n\ndef get_config():\n"
                  "  return ml_collections.ConfigDict({'seed': 1, 'ema': {'decay': 0.5}})\n")
  config = fjt.apply_overrides(fjt.load_config(path), ["swa.every=10", "freeze=Conv_0"])
  assert config.ema.decay == 0.5  # The file's own value stays.
  assert config.swa.every == 10 and config.swa.start_step == 0
  assert config.freeze == ("Conv_0",) and config.init_from == "" and config.mesh.data == -1


@pytest.mark.parametrize("override, message", [
    ("train.stesp=3", "config has no key 'train.stesp' (did you mean 'steps'?)"),
    ("trian.steps=3", "config has no key 'trian' (did you mean 'train'?)"),
    ("train.steps=abc", "config key 'train.steps': expected int, got 'abc'"),
    ("train.steps=1.5", "config key 'train.steps': expected int, got '1.5'"),
    ("optimizer.nesterov=maybe", "config key 'optimizer.nesterov': expected a bool"),
    ("train=3", "config key 'train' is a group"),
])
def test_bad_overrides_are_named(override, message):
  with pytest.raises(fjt.ConfigError) as info:
    fjt.apply_overrides(fjt.load_config(CONFIG), [override])
  assert message in str(info.value)


def test_cli_trains_into_the_default_workdir(tmp_path):
  result = run_train("--config", CONFIG, "--config.train.steps=20", "--config.train.eval_every=20",
                     "--config.optimizer.warmup_steps=2", "--config.model.features=(16,)", cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  summary = json.load(open(tmp_path / "runs" / "digits_mlp" / "summary.json"))
  assert summary["step"] == 20 and 0.0 < summary["eval"]["accuracy"] <= 1.0


def test_cli_trains_with_any_optax_optimizer_by_name(tmp_path):
  # digits_mlp is sgd with momentum and nesterov: switching the name keeps fjt's own keys
  # (learning rate, schedule, weight decay) and gives lion's own arguments their defaults.
  config = fjt.apply_overrides(fjt.load_config(CONFIG), ["optimizer.name=lion"])
  assert "momentum" not in config.optimizer and config.optimizer.b2 == 0.99
  assert config.optimizer.weight_decay == 5e-4 and config.optimizer.schedule == "warmup_cosine"
  result = run_train("--config", CONFIG, "--workdir", str(tmp_path / "lion"),
                     "--config.optimizer.name=lion", "--config.optimizer.learning_rate=0.001",
                     "--config.optimizer.b2=0.98", "--config.train.steps=100",
                     "--config.train.eval_every=100", "--config.optimizer.warmup_steps=5",
                     "--config.model.features=(32,)")
  assert result.returncode == 0, result.stderr
  summary = json.load(open(tmp_path / "lion" / "summary.json"))
  assert summary["eval"]["accuracy"] > 0.5  # Chance is 0.1.
  assert json.load(open(tmp_path / "lion" / "config.json"))["optimizer"]["b2"] == 0.98


@pytest.mark.parametrize("args, message", [
    (("--config.optimizer.name=lamba",), "error: config key 'optimizer.name': 'lamba' is not an "
     "optimizer; expected one of ('sgd',) or the name of an optax optimizer"),
    (("--config.optimizer.name=adam", "--config.optimizer.b3=0.9"),
     "error: config has no key 'optimizer.b3'"),
    (("--config.optimizer.learning_rate=1e39",), "error: config key 'optimizer.learning_rate': "
     "expected a finite number > 0 that fits float32, got 1e+39"),
    (("--config.train.stesp=3",), "error: config has no key 'train.stesp' (did you mean 'steps'?)"),
    (("--config.train.steps=abc",), "error: config key 'train.steps': expected int, got 'abc'"),
    (("--config.train.steps=-1",), "error: config key 'train.steps': expected a positive int, got -1"),
    (("--config.model.name=vgg",), "error: config key 'model.name': unknown model 'vgg'; known "
     "models: ['cnn', "),
    (("--workdir", os.path.join(CONFIG, "sub")), "error: workdir"),
])
def test_cli_errors_are_one_line(args, message):
  result = run_train("--config", CONFIG, *args)
  assert result.returncode == 2
  assert message in result.stderr
  assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_cli_missing_config_file():
  result = run_train("--config", "configs/nope.py")
  assert result.returncode == 2 and "config file 'configs/nope.py' does not exist" in result.stderr
