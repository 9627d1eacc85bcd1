"""Key agreement and share encryption (fedsec.secagg.keys)."""

from __future__ import annotations

import pytest

from fedsec.secagg.keys import decrypt_share, derive_key, encrypt_share, generate_keypair

SESSION = b"session-A"


def test_keypair_shape() -> None:
    _, pub = generate_keypair()
    assert isinstance(pub, bytes) and len(pub) == 32


def test_derive_key_symmetric_and_bound() -> None:
    sk_u, pk_u = generate_keypair()
    sk_v, pk_v = generate_keypair()
    k_uv = derive_key(sk_u, pk_v, session=SESSION, round=3, purpose="mask")
    k_vu = derive_key(sk_v, pk_u, session=SESSION, round=3, purpose="mask")
    assert k_uv == k_vu and len(k_uv) == 32
    others = {
        derive_key(sk_u, pk_v, session=SESSION, round=4, purpose="mask"),
        derive_key(sk_u, pk_v, session=b"session-B", round=3, purpose="mask"),
        derive_key(sk_u, pk_v, session=SESSION, round=3, purpose="shares"),
    }
    assert k_uv not in others and len(others) == 3


def test_derive_key_rejects_small_order_and_bad_input() -> None:
    sk, _ = generate_keypair()
    with pytest.raises(ValueError):
        derive_key(sk, bytes(32), session=SESSION, round=0, purpose="mask")
    with pytest.raises(ValueError):
        derive_key(sk, bytes(31), session=SESSION, round=0, purpose="mask")
    with pytest.raises(ValueError):
        derive_key(sk, bytes(32), session=SESSION, round=-1, purpose="mask")


def _key() -> bytes:
    sk_u, _ = generate_keypair()
    _, pk_v = generate_keypair()
    return derive_key(sk_u, pk_v, session=SESSION, round=1, purpose="shares")


def test_encrypt_decrypt_round_trip() -> None:
    key = _key()
    ct = encrypt_share(key, b"share bytes", sender=1, receiver=2, session=SESSION, round=1)
    assert ct != encrypt_share(key, b"share bytes", sender=1, receiver=2, session=SESSION, round=1)
    assert decrypt_share(key, ct, sender=1, receiver=2, session=SESSION, round=1) == b"share bytes"


@pytest.mark.parametrize(
    ("sender", "receiver", "session", "rnd"),
    [(2, 1, SESSION, 1), (1, 3, SESSION, 1), (1, 2, SESSION, 2), (1, 2, b"other", 1)],
    ids=["swapped-ids", "other-receiver", "replay-other-round", "replay-other-session"],
)
def test_decrypt_rejects_misbinding(sender: int, receiver: int, session: bytes, rnd: int) -> None:
    key = _key()
    ct = encrypt_share(key, b"s", sender=1, receiver=2, session=SESSION, round=1)
    with pytest.raises(ValueError, match="share ciphertext rejected"):
        decrypt_share(key, ct, sender=sender, receiver=receiver, session=session, round=rnd)


def test_decrypt_rejects_tampering_and_wrong_key() -> None:
    key = _key()
    ct = bytearray(encrypt_share(key, b"secret", sender=1, receiver=2, session=SESSION, round=1))
    for pos in (0, 12, len(ct) - 1):
        bad = bytearray(ct)
        bad[pos] ^= 1
        with pytest.raises(ValueError, match="share ciphertext rejected"):
            decrypt_share(key, bytes(bad), sender=1, receiver=2, session=SESSION, round=1)
    with pytest.raises(ValueError, match="share ciphertext rejected"):
        decrypt_share(_key(), bytes(ct), sender=1, receiver=2, session=SESSION, round=1)
    with pytest.raises(ValueError, match="share ciphertext rejected"):
        decrypt_share(key, bytes(ct[:20]), sender=1, receiver=2, session=SESSION, round=1)
