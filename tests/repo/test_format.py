"""The on-disk format: envelope, fixed index and chunk ids behave as docs/repository-format.md says."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from surepoint.errors import DamagedData, WrongPassphrase
from surepoint.repo.chunks import ZERO_ID
from surepoint.repo.crypto import new_key_record, unwrap_keys
from surepoint.repo.envelope import KIND_CHUNK, KIND_INDEX, KIND_MANIFEST, Envelope
from surepoint.repo.fixed_index import FixedIndex

KEYS, RECORD = new_key_record("aes-256-gcm", "pw", "repo-id")
CHACHA_KEYS, _ = new_key_record("chacha20-poly1305", "pw", "repo-id")
ENVELOPES = [Envelope(None), Envelope(KEYS), Envelope(CHACHA_KEYS)]


@pytest.mark.parametrize("env", ENVELOPES, ids=["plain", "aes", "chacha"])
@given(data=st.binary(max_size=5000))
def test_envelope_round_trip(env, data):
    assert env.open(KIND_CHUNK, "name", env.seal(KIND_CHUNK, "name", data)) == data


@pytest.mark.parametrize("env", ENVELOPES, ids=["plain", "aes", "chacha"])
def test_envelope_detects_every_flipped_byte(env):
    blob = env.seal(KIND_CHUNK, "name", b"some data " * 100)
    for pos in range(0, len(blob), max(1, len(blob) // 40)):
        damaged = bytearray(blob)
        damaged[pos] ^= 0x40
        with pytest.raises(DamagedData):
            env.open(KIND_CHUNK, "name", bytes(damaged))


@pytest.mark.parametrize("env", ENVELOPES, ids=["plain", "aes", "chacha"])
def test_envelope_binds_kind_and_name(env):
    blob = env.seal(KIND_MANIFEST, "restorepoints/a", b"{}")
    with pytest.raises(DamagedData):
        env.open(KIND_MANIFEST, "restorepoints/b", blob)
    with pytest.raises(DamagedData):
        env.open(KIND_INDEX, "restorepoints/a", blob)
    with pytest.raises(DamagedData):
        env.open(KIND_MANIFEST, "restorepoints/a", blob[:-5])


def test_encrypted_object_hides_plaintext():
    secret = b"credit card 4111-1111-1111-1111 " * 10
    assert b"credit card" not in Envelope(KEYS).seal(KIND_CHUNK, "x", secret, compress=False)


def test_wrong_passphrase_is_reported_as_such():
    assert unwrap_keys(RECORD, "pw", "repo-id").data == KEYS.data
    with pytest.raises(WrongPassphrase):
        unwrap_keys(RECORD, "not it", "repo-id")


@given(size=st.integers(0, 10_000_000), chunk_shift=st.integers(16, 22))
def test_fixed_index_round_trip(size, chunk_shift):
    index = FixedIndex.empty(size, 1 << chunk_shift)
    index.ids = [bytes([i % 251]) * 32 for i in range(len(index.ids))]
    assert FixedIndex.decode(index.encode()) == index


def test_fixed_index_rejects_truncation():
    index = FixedIndex.empty(10 << 20, 1 << 20)
    data = index.encode()
    for cut in (1, 31, 32, len(data) - 10):
        with pytest.raises(DamagedData):
            FixedIndex.decode(data[:-cut])


def test_zero_chunks_are_recorded_without_data():
    index = FixedIndex.empty(3 << 20, 1 << 20)
    assert index.ids == [ZERO_ID] * 3
    assert index.chunk_range(2) == (2 << 20, 1 << 20)
