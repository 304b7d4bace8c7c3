"""The scorer's configuration (services/scorer/config.py) and scoreboard rendering (scoreboard.py)."""

import math

import pytest

from services.scorer.config import ScorerConfig
from services.scorer.scoreboard import NO_RESULT, markdown, rows
from subnet.envconfig import ConfigError, from_env, markdown_table
from subnet.validation_results import ValidationResult


def test_defaults_and_required_redis_url():
    config = from_env(ScorerConfig, {"REDIS_URL": "redis://h:1/0"})
    assert (config.w_loss, config.w_diversity, config.w_active) == (0.6, 0.2, 0.2)
    assert (config.loss_scale, config.ema_alpha, config.ban_ema) == (0.02, 0.3, 0.0)
    assert config.key_prefix == "moe:scores:" and config.validation_prefix == "moe:validation:"
    with pytest.raises(ConfigError, match="REDIS_URL is required"):
        from_env(ScorerConfig, {})


@pytest.mark.parametrize("var,value,message", [
    ("SCORER_EMA_ALPHA", "0", "SCORER_EMA_ALPHA"),
    ("SCORER_EMA_ALPHA", "1.5", "SCORER_EMA_ALPHA"),
    ("SCORER_LOSS_SCALE", "-1", "SCORER_LOSS_SCALE"),
    ("SCORER_W_LOSS", "-0.5", "SCORER_W_LOSS"),
    ("SCORER_CLAIM_IDLE_S", "nan", "SCORER_CLAIM_IDLE_S"),
    ("SCORER_BAN_EMA", "2", "SCORER_BAN_EMA"),
])
def test_bad_values_name_their_variable(var, value, message):
    with pytest.raises(ConfigError, match=message):
        from_env(ScorerConfig, {"REDIS_URL": "redis://h:1/0", var: value})
    with pytest.raises(ConfigError, match="SCORER_W_"):
        from_env(ScorerConfig, {"REDIS_URL": "redis://h:1/0", "SCORER_W_LOSS": "0", "SCORER_W_DIVERSITY": "0",
                                "SCORER_W_ACTIVE": "0"})


def test_env_table_lists_scorer_wallet_chain_and_round_variables():
    table = markdown_table(ScorerConfig)
    for var in ("SCORER_W_LOSS", "SCORER_EMA_ALPHA", "SCORER_RUN_DIR", "WALLET_NAME", "CHAIN", "ROUND_MERGE_BLOCKS"):
        assert f"`{var}`" in table


def test_scoreboard_rows_and_markdown():
    results = {"a": ValidationResult(round=2, hotkey="a", verified=True, loss_delta=math.nan, diversity=0.5,
                                     active_ratio=1.0),
               "b": ValidationResult(round=2, hotkey="b", reason="copy | of a")}
    table = rows(results, {"a": 0.4, "b": 0.0}, {"a": 0.2, "b": 0.0, "c": 0.1}, {1: 0.67, 3: 0.33},
                 {"a": 1, "b": 2, "c": 3, "d": 4}, banned={"b"})
    assert [r["hotkey"] for r in table] == ["a", "b", "c"]      # d: no result, no EMA
    assert table[0]["loss_delta"] is None and table[0]["reason"] == "" and table[0]["weight"] == 0.67
    assert table[1]["reason"] == "copy | of a" and table[1]["banned"]
    assert table[2]["reason"] == NO_RESULT and table[2]["score"] is None
    text = markdown(2, 29, False, "every registered miner's EMA is 0", table)
    assert "no weights submitted" in text and "copy / of a" in text      # a pipe would break the table
    assert all(line.count("|") == 12 for line in text.splitlines() if line.startswith("|"))
