"""NATS decentralised auth material for tests: NKey users and an operator → account → user JWT chain.

What `nsc`/`nk` would produce, built with the `nkeys` package (ed25519 seeds; JWTs are header.claims.signature,
base64url without padding, signed by the issuer's key, format version 2).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nkeys

_UNLIMITED: dict[str, Any] = {
    "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": True, "conn": -1, "leaf": -1,
}  # fmt: skip
_JETSTREAM: dict[str, Any] = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}


def new_key(prefix: int) -> nkeys.KeyPair:
    return nkeys.from_seed(bytearray(nkeys.encode_seed(os.urandom(32), prefix)))


def public(key: nkeys.KeyPair) -> str:
    return bytes(key.public_key).decode()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _jwt(issuer: nkeys.KeyPair, subject: str, name: str, nats: dict[str, Any]) -> str:
    claims: dict[str, Any] = {"iat": int(time.time()), "iss": public(issuer), "name": name, "sub": subject}
    claims["nats"] = {**nats, "version": 2}
    digest = hashlib.sha256(json.dumps(claims, sort_keys=True).encode()).digest()
    claims["jti"] = base64.b32encode(digest).decode().rstrip("=")
    signed = f"{_b64(json.dumps({'typ': 'JWT', 'alg': 'ed25519-nkey'}).encode())}.{_b64(json.dumps(claims).encode())}"
    return f"{signed}.{_b64(issuer.sign(signed.encode()))}"


def _account(operator: nkeys.KeyPair, account: nkeys.KeyPair, name: str, *, jetstream: bool) -> str:
    limits = {**_UNLIMITED, **(_JETSTREAM if jetstream else {})}
    return _jwt(operator, public(account), name, {"type": "account", "limits": limits, "default_permissions": {}})


def nkey_user_config(directory: Path) -> tuple[Path, Path]:
    """A server config admitting one NKey user, and that user's seed file: (config, seed file)."""
    user = new_key(nkeys.PREFIX_BYTE_USER)
    config = directory / "nkey.conf"
    config.write_text(f"authorization {{ users = [ {{ nkey: {public(user)} }} ] }}\n")
    seed = directory / "user.nk"
    seed.write_text(bytes(user.seed).decode() + "\n")
    return config, seed


@dataclass(frozen=True)
class OperatorSetup:
    config: Path  # nats-server config in operator mode (memory resolver, system account, JetStream-enabled account)
    creds: Path  # the user's .creds file
    foreign_creds: Path  # a user of an account the server does not know


def operator_setup(directory: Path) -> OperatorSetup:
    operator = new_key(nkeys.PREFIX_BYTE_OPERATOR)
    system = new_key(nkeys.PREFIX_BYTE_ACCOUNT)
    account = new_key(nkeys.PREFIX_BYTE_ACCOUNT)
    config = directory / "operator.conf"
    config.write_text(
        f"operator: {_jwt(operator, public(operator), 'op', {'type': 'operator'})}\n"
        f"system_account: {public(system)}\n"
        "resolver: MEMORY\n"
        "resolver_preload: {\n"
        f"  {public(system)}: {_account(operator, system, 'SYS', jetstream=False)}\n"
        f"  {public(account)}: {_account(operator, account, 'hl', jetstream=True)}\n"
        "}\n"
    )
    stranger = new_key(nkeys.PREFIX_BYTE_ACCOUNT)
    creds = _creds(directory / "user.creds", account)
    return OperatorSetup(config, creds, _creds(directory / "foreign.creds", stranger))


def _creds(path: Path, account: nkeys.KeyPair) -> Path:
    user = new_key(nkeys.PREFIX_BYTE_USER)
    limits = {"subs": -1, "data": -1, "payload": -1}  # omitted limits are zero: nothing could be sent
    token = _jwt(account, public(user), "hl-monitor", {"type": "user", "pub": {}, "sub": {}, **limits})
    path.write_text(
        "-----BEGIN NATS USER JWT-----\n"
        f"{token}\n"
        "------END NATS USER JWT------\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{bytes(user.seed).decode()}\n"
        "------END USER NKEY SEED------\n"
    )
    return path
