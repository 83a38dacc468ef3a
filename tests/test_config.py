"""The one config system: defaults < TOML < flags, dotted keys, types, unknown keys as errors."""

from dataclasses import dataclass
from dataclasses import field as dc_field

import pytest

from tinychat.config import ConfigError, dumps_toml, field, from_dict, load_toml, parse_args


@dataclass
class Opt:
    lr: float = field(1e-3)
    steps: int = field(10)
    schedule: str = field("cosine")


@dataclass
class Cmd:
    name: str = field("", positional=True)
    inputs: list[str] = field([])
    verbose: bool = field(False)
    seed: int | None = field(None)
    optim: Opt = dc_field(default_factory=Opt)


def test_defaults_toml_then_flags(tmp_path):
    (tmp_path / "c.toml").write_text("verbose = true\n[optim]\nlr = 0.5\nsteps = 3\n")
    cfg = parse_args(Cmd, ["--config", str(tmp_path / "c.toml"), "--optim.steps", "7", "run1"])
    assert (cfg.name, cfg.verbose, cfg.optim.lr, cfg.optim.steps) == ("run1", True, 0.5, 7)
    assert cfg.optim.schedule == "cosine"


def test_flag_spellings_lists_bools_and_optionals():
    cfg = parse_args(Cmd, ["--inputs", "a.txt", "b/", "--verbose", "--seed=3", "--optim-lr", "2e-4"][:-2])
    assert cfg.inputs == ["a.txt", "b/"] and cfg.verbose and cfg.seed == 3
    cfg = parse_args(Cmd, ["--steps", "5", "--seed", "none", "--optim.lr", "-1"])  # bare name of a nested field
    assert cfg.optim.steps == 5 and cfg.seed is None and cfg.optim.lr == -1.0


def test_a_repeated_list_flag_extends_and_a_repeated_value_flag_keeps_the_last(tmp_path):
    """`--adapter a=x --adapter b=y` must serve both adapters, not silently only the last one."""
    cfg = parse_args(Cmd, ["--inputs", "a", "--seed", "1", "--inputs", "b", "c", "--seed", "2"])
    assert cfg.inputs == ["a", "b", "c"] and cfg.seed == 2
    (tmp_path / "c.toml").write_text('inputs = ["t"]\n')  # flags replace the file's list, and extend each other
    assert parse_args(Cmd, ["--config", str(tmp_path / "c.toml"), "--inputs", "x", "--inputs", "y"]).inputs == [
        "x",
        "y",
    ]


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["--optim.nope", "1"], "unknown option --optim.nope"),
        (["--steps", "x"], "must be of type int"),
        (["--verbose=maybe"], "true or false"),
        (["--optim", "1"], "names a section"),
        (["--seed", "1", "a", "b"], "unexpected argument .b."),
        (["--config", "/no/such.toml"], "does not exist"),
    ],
)
def test_errors_are_one_sentence(argv, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_args(Cmd, argv)


def test_unknown_toml_key_is_an_error(tmp_path):
    (tmp_path / "c.toml").write_text("[optim]\nlearning_rate = 1\n")
    with pytest.raises(ConfigError, match="unknown config key 'optim.learning_rate'"):
        parse_args(Cmd, ["--config", str(tmp_path / "c.toml")])


def test_toml_round_trip(tmp_path):
    cfg = parse_args(Cmd, ["x", "--inputs", "a", "--optim.lr", "0.25"])
    (tmp_path / "c.toml").write_text(dumps_toml(cfg))
    again = from_dict(Cmd, load_toml(tmp_path / "c.toml"))
    assert again == cfg


def test_presets_in_configs_dir_parse():
    """Every TOML preset shipped in configs/ is valid TOML (commands validate their own sections)."""
    from pathlib import Path

    for path in sorted(Path(__file__).parents[1].joinpath("configs").glob("*.toml")):
        assert isinstance(load_toml(path), dict)


@pytest.mark.parametrize(("command", "lr"), [("sft", "0.001"), ("dpo", "0.0001"), ("grpo", "5e-05")])
def test_help_prints_each_commands_own_train_defaults(command, lr, capsys):
    """`--help` must show the learning rate the command will use, not the generic [train] default (3e-3)."""
    from tinychat.cli import main

    assert main([command, "--help"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("--train.lr "))
    assert f"default {lr} " in line


@dataclass
class Unions:
    eos: int | list[int] | None = field(None)
    weights: dict[str, float] = field({})


def test_union_fields_take_their_first_fitting_member_from_toml_and_flags(tmp_path):
    """A field such as the model's eos_token_id (int | list[int] | None): a run's saved config.pretrain.toml
    holds `eos_token_id = 2`, and loading it again once failed with "unsupported type"."""
    assert from_dict(Unions, {"eos": 2}).eos == 2 and from_dict(Unions, {"eos": [2, 5]}).eos == [2, 5]
    assert parse_args(Unions, ["--eos", "3"]).eos == 3 and parse_args(Unions, ["--eos", "none"]).eos is None
    with pytest.raises(ConfigError, match="eos must be int or list or none"):
        parse_args(Unions, ["--eos", "x"])


def test_a_table_flag_takes_a_toml_inline_table():
    assert parse_args(Unions, ["--weights", '{"*" = 2, facts = 0.5}']).weights == {"*": 2, "facts": 0.5}
    with pytest.raises(ConfigError, match="TOML table"):
        parse_args(Unions, ["--weights", "facts=2"])


def test_a_runs_saved_stage_config_loads_again(tmp_path):
    from tinychat.train.pretrain import PretrainConfig

    cfg = from_dict(PretrainConfig, {"model": {"eos_token_id": 2}})
    (tmp_path / "config.pretrain.toml").write_text(dumps_toml(cfg))
    again = parse_args(PretrainConfig, ["--config", str(tmp_path / "config.pretrain.toml")])
    assert again.model.eos_token_id == 2 and again == cfg
