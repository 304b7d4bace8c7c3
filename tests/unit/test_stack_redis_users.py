"""The local stack hands the restricted Redis user to its miners and to nobody else."""

from pathlib import Path

from moe.config import preset
from services.stack.config import StackConfig
from services.stack.miners import miner_env, plan_miners
from services.stack.redis_users import ADMIN_RULES, stack_redis_users
from services.stack.wallets import StackWallets
from subnet.envconfig import from_env
from subnet.redis_acl import MINER_USER, miner_rules
from subnet.redis_urls import with_credentials

PLAIN = "redis://127.0.0.1:6399/0"


def test_users_get_fresh_passwords_and_the_miner_rules():
    first, second = stack_redis_users(), stack_redis_users()
    assert first["default"][1] == ADMIN_RULES and first[MINER_USER][1] == miner_rules(local_chain=True)
    assert len({first["default"][0], first[MINER_USER][0], second["default"][0]}) == 3
    assert all(len(password) >= 24 for password, _ in first.values())


def test_every_redis_url_a_miner_gets_is_the_miner_users(tmp_path: Path):
    users = stack_redis_users()
    admin_url = with_credentials(PLAIN, "", users["default"][0])
    miner_url = with_credentials(PLAIN, MINER_USER, users[MINER_USER][0])
    subnet_env = {"CHAIN": "local", "CHAIN_REDIS_URL": admin_url}   # what SubnetLayer.env() gives everyone
    for discovery, registry_url in (("registry", miner_url), ("chain", "")):   # chain: no registry entries
        cfg = from_env(StackConfig, {"STACK_DISCOVERY": discovery})
        for i, miner in enumerate(plan_miners([15061, 15062], ("lazy",))):
            env = miner_env(miner, i, cfg, preset("tiny"), miner_url, tmp_path / "experts.safetensors",
                            tmp_path, StackWallets(tmp_path), subnet_env)
            redis_urls = {k: v for k, v in env.items() if "REDIS" in k}
            assert redis_urls == {"REDIS_URL": registry_url, "CHAIN_REDIS_URL": miner_url}
            assert not any(users["default"][0] in value for value in env.values())
            assert env.get("EXPERT_SERVE_ON_CHAIN", "0") == ("1" if discovery == "chain" else "0")
