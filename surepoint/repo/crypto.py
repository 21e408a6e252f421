"""Repository keys: a passphrase-derived key-encryption key wraps random data and chunk-id keys."""

from __future__ import annotations

import base64
import hmac
import json
import os
from dataclasses import dataclass

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from surepoint.errors import DamagedData, InvalidRepositoryConfig, WrongPassphrase

CIPHERS = {"aes-256-gcm": AESGCM, "chacha20-poly1305": ChaCha20Poly1305}
CIPHER_CODES = {"none": 0, "aes-256-gcm": 1, "chacha20-poly1305": 2}
NONCE_SIZE = 12

# scrypt cost: about 0.1 s and 32 MiB per derivation on a current core; stored per repository.
DEFAULT_SCRYPT = {"n": 2**15, "r": 8, "p": 1}


@dataclass(frozen=True)
class Keys:
    """The secrets of an encrypted repository: `data` encrypts objects, `chunk_id` keys the chunk digest."""

    cipher: str
    data: bytes
    chunk_id: bytes

    def aead(self) -> AESGCM | ChaCha20Poly1305:
        return CIPHERS[self.cipher](self.data)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def _kek(passphrase: str, kdf: dict) -> bytes:
    scrypt = Scrypt(salt=_unb64(kdf["salt"]), length=32, n=kdf["n"], r=kdf["r"], p=kdf["p"])
    return scrypt.derive(passphrase.encode())


def new_key_record(cipher: str, passphrase: str, repository_id: str) -> tuple[Keys, dict]:
    """Make fresh random keys and the config record that stores them wrapped by the passphrase."""
    if cipher not in CIPHERS:
        raise InvalidRepositoryConfig(f"unknown encryption {cipher!r}: choose none, aes-256-gcm or chacha20-poly1305")
    if not passphrase:
        raise InvalidRepositoryConfig("an encrypted repository needs a non-empty passphrase")
    keys = Keys(cipher, os.urandom(32), os.urandom(32))
    kdf = {"name": "scrypt", **DEFAULT_SCRYPT, "salt": _b64(os.urandom(16))}
    nonce = os.urandom(NONCE_SIZE)
    secret = json.dumps({"data": _b64(keys.data), "chunk_id": _b64(keys.chunk_id)}).encode()
    wrapped = CIPHERS[cipher](_kek(passphrase, kdf)).encrypt(nonce, secret, _key_aad(repository_id))
    return keys, {"cipher": cipher, "kdf": kdf, "wrapped_key": _b64(nonce + wrapped)}


def unwrap_keys(record: dict, passphrase: str, repository_id: str) -> Keys:
    """Recover the keys from the config record; a wrong passphrase fails authentication."""
    try:
        blob = _unb64(record["wrapped_key"])
        aead = CIPHERS[record["cipher"]](_kek(passphrase, record["kdf"]))
    except (ValueError, TypeError, KeyError):
        raise DamagedData("repository config is damaged: its key record is unreadable") from None
    try:
        secret = json.loads(aead.decrypt(blob[:NONCE_SIZE], blob[NONCE_SIZE:], _key_aad(repository_id)))
    except InvalidTag:
        raise WrongPassphrase("wrong passphrase for this repository") from None
    except ValueError:
        raise DamagedData("repository config is damaged: its key record is unreadable") from None
    return Keys(record["cipher"], _unb64(secret["data"]), _unb64(secret["chunk_id"]))


def _key_aad(repository_id: str) -> bytes:
    return b"surepoint-key:" + repository_id.encode()


def rewrap_keys(record: dict, old_passphrase: str, new_passphrase: str, repository_id: str) -> dict:
    """The config record with the same keys wrapped by a new passphrase (fresh salt); no data changes."""
    if not new_passphrase:
        raise InvalidRepositoryConfig("the new passphrase must not be empty")
    keys = unwrap_keys(record, old_passphrase, repository_id)
    kdf = {"name": "scrypt", **DEFAULT_SCRYPT, "salt": _b64(os.urandom(16))}
    nonce = os.urandom(NONCE_SIZE)
    secret = json.dumps({"data": _b64(keys.data), "chunk_id": _b64(keys.chunk_id)}).encode()
    wrapped = CIPHERS[record["cipher"]](_kek(new_passphrase, kdf)).encrypt(nonce, secret, _key_aad(repository_id))
    return {"cipher": record["cipher"], "kdf": kdf, "wrapped_key": _b64(nonce + wrapped)}


# The config MAC ---------------------------------------------------------------------------------
# An encrypted repository's config carries "mac": keyed BLAKE3 over its canonical JSON (every field
# but "mac", keys sorted, no spaces, ASCII), keyed with a key derived from the data key. Only a
# holder of the passphrase can make one, so a config edited by whoever can write to the storage
# (its encryption, chunk size, compression, KDF parameters, id) fails the check.
class ConfigNotAuthentic(DamagedData):
    """An encrypted repository's config fails its MAC: someone without the key changed it."""


CONFIG_MAC_CONTEXT = "surepoint 2026 repository config mac v1"
CONFIG_MAC_FIELD = "mac"


def canonical_config(config: dict) -> bytes:
    body = {k: v for k, v in config.items() if k != CONFIG_MAC_FIELD}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def config_mac(keys: Keys, config: dict) -> str:
    mac_key = blake3.blake3(keys.data, derive_key_context=CONFIG_MAC_CONTEXT).digest()
    return blake3.blake3(canonical_config(config), key=mac_key).hexdigest()


def config_mac_matches(keys: Keys, config: dict) -> bool:
    stored = config.get(CONFIG_MAC_FIELD)
    return isinstance(stored, str) and hmac.compare_digest(stored, config_mac(keys, config))


def key_record_fingerprint(record: dict | None) -> str:
    """A short digest of the encryption record (cipher, KDF, wrapped key), for the client's memory."""
    text = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return blake3.blake3(text.encode()).hexdigest()[:32]
