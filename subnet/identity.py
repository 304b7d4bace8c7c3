"""Who a service is on the subnet: its wallet's hotkey, which signs its requests.

    identity = load_identity(from_env(WalletConfig))     # IdentityError naming the file to create
    signature = identity.sign(payload)                    # 64-byte sr25519 signature
    verify_signature(identity.hotkey, payload, signature) # True

    python -m subnet.identity dev-wallet --path .wallets --name router --hotkey default

The wallet is a bittensor-wallet directory (`<path>/<name>/hotkeys/<hotkey>`), as `btcli`
writes it. Only the hotkey is loaded; the coldkey never leaves its file. `create_dev_wallet`
makes an unencrypted wallet for the local stack and the tests, never for real funds.

An Identity shows only its public hotkey: repr, str and logs never carry the secret key.
`identity.derive_key(purpose)` gives a 32-byte symmetric key that only the holder of this hotkey's
secret can compute (HMAC-SHA256 of the secret key, labelled by purpose): what seals a service's
private objects, e.g. an expert's recovery checkpoints (subnet/sealed.py).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import re
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from bittensor_wallet import Keypair, Wallet

from subnet.envconfig import env

DEFAULT_WALLET_PATH = "~/.bittensor/wallets"   # btcli's default, so an existing wallet is found as is
_FILE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_PUBLIC_KEYS_CACHED = 4096                     # verifying keys parsed from ss58, most recently used


@dataclass(frozen=True)
class WalletConfig:
    """Which wallet hotkey a service signs with; read with `from_env(WalletConfig)` or nested."""

    name: str = env("WALLET_NAME", "default", "wallet (coldkey) name: the directory under WALLET_PATH")
    hotkey: str = env("WALLET_HOTKEY", "default", "hotkey name: the file `<WALLET_PATH>/<WALLET_NAME>/hotkeys/<name>`")
    path: str = env("WALLET_PATH", DEFAULT_WALLET_PATH, "directory holding the wallets (btcli's `--wallet.path`)")

    def __post_init__(self) -> None:
        if not self.path.strip():   # an empty path would silently mean the current directory
            raise ValueError(f"WALLET_PATH must not be empty; give the wallets' directory, e.g. {DEFAULT_WALLET_PATH}")
        # Both name files under WALLET_PATH: "../x" or "a/b" would read (or create) keys elsewhere.
        for var, value in (("WALLET_NAME", self.name), ("WALLET_HOTKEY", self.hotkey)):
            if not _FILE_NAME.fullmatch(value) or value in (".", ".."):
                raise ValueError(f"{var}={value!r} must be a plain file name (letters, digits, '.', '_', '-'; "
                                 f"no '/'), e.g. default")

    @property
    def hotkey_file(self) -> Path:
        return Path(self.path).expanduser() / self.name / "hotkeys" / self.hotkey


class IdentityError(RuntimeError):
    """The wallet's hotkey cannot be loaded; the message names the file and how to create it."""


class Identity:
    """A hotkey that signs. Holds the key pair privately; shows only the ss58 hotkey."""

    __slots__ = ("hotkey", "_keypair", "_secret")

    def __init__(self, keypair: Keypair, secret: bytes | None = None):
        """`secret`: the key pair's private key bytes, for `derive_key` (the SDK's Keypair does not
        give them out); without it the identity signs but derives no keys."""
        if keypair.crypto_type != 1:
            raise IdentityError("the hotkey must be an sr25519 key (crypto type 1)")
        self._keypair = keypair
        self._secret = secret
        self.hotkey: str = keypair.ss58_address

    @classmethod
    def generate(cls) -> Identity:
        """A fresh random identity (tests, throwaway clients); nothing is written to disk."""
        seed = os.urandom(32)
        return cls(Keypair.create_from_seed(seed.hex()), secret=seed)

    def sign(self, data: bytes) -> bytes:
        return bytes(self._keypair.sign(data))

    def derive_key(self, purpose: str) -> bytes:
        """A 32-byte key for `purpose` that only this hotkey's holder can compute. IdentityError
        when this identity was built without its secret."""
        if self._secret is None:
            raise IdentityError(f"the identity of {self.hotkey} holds no private key bytes to derive a key "
                                f"from (load it from its wallet file: subnet.identity.load_identity)")
        return hmac.new(self._secret, f"moe-subnet derived key v1\n{purpose}".encode(), hashlib.sha256).digest()

    def __repr__(self) -> str:
        return f"Identity(hotkey={self.hotkey!r})"

    __str__ = __repr__

    def __reduce__(self):
        raise TypeError("an Identity holds a secret key and is not pickled; pass its WalletConfig instead")


def load_identity(config: WalletConfig) -> Identity:
    """The wallet's hotkey as an Identity. IdentityError when the file is missing, unreadable,
    encrypted (a service cannot type a password) or not a key."""
    path = config.hotkey_file
    create = (f"create it with `btcli wallet new_hotkey --wallet.name {config.name} --wallet.hotkey "
              f"{config.hotkey} --wallet.path {config.path}`, or for local development `python -m "
              f"subnet.identity dev-wallet --path {config.path} --name {config.name} --hotkey {config.hotkey}`; "
              f"WALLET_PATH, WALLET_NAME and WALLET_HOTKEY choose another")
    if not path.is_file():
        raise IdentityError(f"hotkey file {path} does not exist: {create}")
    if not os.access(path, os.R_OK):
        raise IdentityError(f"hotkey file {path} is not readable by this user (uid {os.getuid()}); "
                            f"fix its permissions or run as its owner")
    wallet = Wallet(name=config.name, hotkey=config.hotkey, path=str(Path(config.path).expanduser()))
    try:
        if wallet.hotkey_file.is_encrypted():
            raise IdentityError(f"hotkey file {path} is encrypted; a service cannot ask for its password: "
                                f"use an unencrypted hotkey (btcli's default for hotkeys)")
        return Identity(wallet.get_hotkey(), secret=_private_key_bytes(path))
    except IdentityError:
        raise
    except Exception as e:  # bittensor-wallet raises its own KeyFileError and plain ValueErrors
        # Never include the file's content: it is the secret key.
        raise IdentityError(f"hotkey file {path} is not a usable hotkey ({type(e).__name__}); {create}") from None


def _private_key_bytes(path: Path) -> bytes | None:
    """The `privateKey` of an unencrypted keyfile (bittensor-wallet's JSON), or None if the file
    has another layout: the identity then signs but derives no keys."""
    try:
        value = json.loads(path.read_bytes()).get("privateKey")
        return bytes.fromhex(value.removeprefix("0x")) if isinstance(value, str) and value else None
    except (ValueError, AttributeError, OSError):
        return None


def create_dev_wallet(path: str | Path, name: str, hotkey: str = "default") -> WalletConfig:
    """Create an unencrypted wallet (coldkey + hotkey) for development; keep what exists.

    Idempotent: an existing coldkey or hotkey is left as it is (bittensor-wallet would ask
    on stdin whether to overwrite). Prints nothing: the mnemonics are not shown.
    """
    config = WalletConfig(name=name, hotkey=hotkey, path=str(path))
    root = Path(path).expanduser()
    wallet = Wallet(name=name, hotkey=hotkey, path=str(root))
    try:
        if not (root / name / "coldkeypub.txt").exists():
            wallet.create_new_coldkey(use_password=False, overwrite=False, suppress=True)
        if not config.hotkey_file.exists():
            wallet.create_new_hotkey(use_password=False, overwrite=False, suppress=True)
    except Exception as e:   # the SDK's KeyFileError (no common base): an unwritable or missing path
        raise IdentityError(f"cannot create the wallet {name!r} under {root}: {e}") from None
    return config


class _PublicKeys:
    """ss58 -> verifying Keypair, bounded LRU: parsing an address costs more than a dict hit."""

    def __init__(self, size: int):
        self._size = size
        self._lock = threading.Lock()
        self._keys: OrderedDict[str, Keypair] = OrderedDict()

    def get(self, hotkey: str) -> Keypair:
        with self._lock:
            key = self._keys.get(hotkey)
            if key is not None:
                self._keys.move_to_end(hotkey)
                return key
        key = Keypair(ss58_address=hotkey)  # ValueError for a malformed address
        with self._lock:
            self._keys[hotkey] = key
            while len(self._keys) > self._size:
                self._keys.popitem(last=False)
        return key


_public_keys = _PublicKeys(_PUBLIC_KEYS_CACHED)


def is_hotkey(text: str) -> bool:
    """Whether `text` is a well-formed ss58 address."""
    try:
        _public_keys.get(text)
    except (ValueError, TypeError):
        return False
    return True


def verify_signature(hotkey: str, data: bytes, signature: bytes) -> bool:
    """Whether `signature` is `hotkey`'s sr25519 signature of `data`; False for any malformed input."""
    try:
        return bool(_public_keys.get(hotkey).verify(data, signature))
    except (ValueError, TypeError):
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m subnet.identity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    dev = sub.add_parser("dev-wallet", help="create an unencrypted development wallet; print its ss58 hotkey")
    dev.add_argument("--path", default=DEFAULT_WALLET_PATH)
    dev.add_argument("--name", default="default")
    dev.add_argument("--hotkey", default="default")
    args = parser.parse_args(argv)
    try:
        config = create_dev_wallet(args.path, args.name, args.hotkey)
        print(load_identity(config).hotkey)
    except (ValueError, OSError, IdentityError) as e:
        print(f"subnet.identity dev-wallet: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
