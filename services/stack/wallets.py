"""The local stack's development wallets (unencrypted, under `<STACK_RUN_DIR>/wallets`): one per
process, made by `subnet.identity.create_dev_wallet`. Never used outside the stack."""

from __future__ import annotations

from pathlib import Path

from subnet.identity import Identity, create_dev_wallet, load_identity


class StackWallets:
    def __init__(self, run: Path):
        self.path = run / "wallets"
        self.router = self.identity("stack-router")
        self.client = self.identity("stack-client")

    def identity(self, name: str) -> Identity:
        return load_identity(create_dev_wallet(self.path, name))

    def env(self, name: str, allow: str = "") -> dict[str, str]:
        """WALLET_* of wallet `name` (made if missing) and AUTH_ALLOWLIST (the hotkeys it accepts)."""
        wallet = create_dev_wallet(self.path, name)
        return {"WALLET_PATH": wallet.path, "WALLET_NAME": wallet.name, "WALLET_HOTKEY": wallet.hotkey,
                "AUTH_ALLOWLIST": allow}
