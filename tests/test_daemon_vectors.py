"""Wycheproof vectors through a real daemon over its socket, with nothing but the client API.

The crypto modules pass these files directly (test_asymmetric_vectors.py,
test_crypto_vectors.py); here the same cases go through the wire protocol,
the handlers and the key store: keys are loaded with add(), used by serial,
and derived keys, which cannot be read, are checked by a MAC computed inside
keyden.  "valid" must be accepted with the right output, "invalid" rejected
with a KeydenError, "acceptable" may go either way; a daemon internal error
(EIO) or any other exception is a failure.  Each file is one test that counts
its outcomes (printed) and asserts most cases ran.

Thousands of cases must not cost thousands of round trips: everything is
pipelined, with ``client.call_many`` where the arguments are positional and
the asyncio client where a method takes keyword-only ones (derive, kdf,
cipher, batch), which ``call_many`` cannot pass.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
from collections import defaultdict
from typing import NamedTuple

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519

import keyden
from keyden import errors as E
from keyden.crypto import agreement as A

try:
    from tests import wycheproof
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    import wycheproof

PROBE = b"probe"
CALLS_PER_ROUND_TRIP = 256   # bounds what call_many writes before it reads


class Fault(Exception):
    """Not a verdict: the daemon failed internally (EIO), or a key it derived cannot be used."""


def _fault_if_internal(result):
    """The daemon answers an exception in a handler with EIO "internal error"; nothing else uses EIO."""
    return Fault(f"daemon internal error: {result}") if isinstance(result, E.EIO) else result


def call_many(client, calls: list[tuple[str, tuple]]) -> list:
    """client.call_many in bounded round trips: each result a value or the KeydenError (or Fault)."""
    results = []
    for start in range(0, len(calls), CALLS_PER_ROUND_TRIP):
        results += client.call_many(calls[start:start + CALLS_PER_ROUND_TRIP])
    return [_fault_if_internal(r) for r in results]


def pipelined(client, calls: list[tuple[str, tuple, dict]]) -> list:
    """[(method, args, kwargs)] in the client's session, all in flight at once (asyncio client)."""
    async def run():
        async with await keyden.aconnect(client.socket_path, session=client.session_token) as aio:
            return await asyncio.gather(*(getattr(aio, name)(*args, **kwargs) for name, args, kwargs in calls),
                                        return_exceptions=True)
    return [_fault_if_internal(r) for r in asyncio.run(run())]


def add_each(client, key_type: str, description_prefix: str, payloads) -> dict[bytes, int]:
    """Add every distinct payload once (pipelined): payload -> serial.  Setup, so any failure raises."""
    distinct = list(dict.fromkeys(payloads))
    calls = [("add", (key_type, f"{description_prefix}{i}" if description_prefix else "", payload, "@s"))
             for i, payload in enumerate(distinct)]
    serials = call_many(client, calls)
    for serial in serials:
        if not isinstance(serial, int):
            raise serial
    return dict(zip(distinct, serials))


# ---------------------------------------------------------------------------
# KEYCTL_PKEY_* (issue "core"): signatures and OAEP


class PipelinedKeys:
    """Key objects for ``wycheproof.run_vectors`` whose operations run in the daemon, pipelined.

    run_vectors asks each key object for one answer at a time.  To answer
    in a few round trips it runs twice: the recording pass notes every key
    and call it needs (answered with placeholders; its verdicts are thrown
    away), ``send`` loads every key and makes every call with call_many,
    and the replay pass answers from those results, so run_vectors judges
    the daemon exactly as it judges the crypto module.
    """

    def __init__(self, client):
        self.client = client
        self.recording = True
        self.serials: dict[bytes, int | Exception | None] = {}   # key DER -> serial, or why add() refused it
        self.answers: dict[tuple, object] = {}                  # (op, key DER, *args) -> value or exception

    def parse(self, der: bytes) -> "DaemonKey":
        if self.recording:
            self.serials.setdefault(der, None)
        elif not isinstance(self.serials[der], int):
            raise self.serials[der]  # e.g. EINVAL "unsupported RSA size": run_vectors skips the group
        return DaemonKey(self, der)

    def answer(self, call: tuple):
        if self.recording:
            self.answers[call] = None
            return b""
        result = self.answers[call]
        if isinstance(result, Exception):
            raise result
        return result

    def send(self) -> None:
        ders = list(self.serials)
        self.serials = dict(zip(ders, call_many(self.client, [("add", ("asymmetric", "", der, "@s")) for der in ders])))
        calls = [call for call in self.answers if isinstance(self.serials[call[1]], int)]
        results = call_many(self.client, [(op, (self.serials[der], *args)) for op, der, *args in calls])
        self.answers = dict(zip(calls, results))
        self.recording = False


class DaemonKey:
    """The ParsedKey interface run_vectors uses, for a key held by the daemon."""

    def __init__(self, keys: PipelinedKeys, der: bytes):
        self.keys, self.der = keys, der

    def verify(self, info: str, digest: bytes, signature: bytes) -> None:
        self.keys.answer(("pkey_verify", self.der, info, digest, signature))

    def decrypt(self, info: str, data: bytes) -> bytes:
        return self.keys.answer(("pkey_decrypt", self.der, info, data))


@pytest.mark.parametrize("vf", wycheproof.FILES, ids=[vf.id for vf in wycheproof.FILES])
def test_pkey_vectors_through_daemon(client, vf):
    """Every file the crypto module passes, public keys as SPKI and OAEP keys as PKCS#8."""
    keys = PipelinedKeys(client)
    wycheproof.run_vectors(vf, keys.parse)     # recording pass
    keys.send()
    counts, failures = wycheproof.run_vectors(vf, keys.parse)
    print(vf.filename, counts)
    assert not failures, f"{vf.filename}: {len(failures)} failures\n" + "\n".join(failures[:30])
    ran = counts["valid"] + counts["invalid"] + counts["acceptable"]
    assert counts["valid"] > 0 and ran >= vf.min_run * (ran + counts["skipped"]), counts


# ---------------------------------------------------------------------------
# Session keys (issue "Session keys"): AEAD by serial


class AeadJob(NamedTuple):
    """One AEAD call a case asks for."""

    case: wycheproof.Case
    serial: int
    decrypt: bool
    data: bytes
    expected: bytes

    @property
    def direction(self) -> str:
        return "decrypt" if self.decrypt else "encrypt"


def _aead_jobs(case, serial: int) -> list[AeadJob]:
    """Decrypt every case; encrypt the valid ones, and the odd nonces (which must be refused either way)."""
    sealed = case.hex("ct") + case.hex("tag")
    jobs = [AeadJob(case, serial, True, sealed, case.hex("msg"))]
    if case.result == "valid" or len(case.hex("iv")) != 12:
        jobs.append(AeadJob(case, serial, False, case.hex("msg"), sealed))
    return jobs


def _one_shot(client, alg: str, jobs: list[AeadJob]) -> list:
    return pipelined(client, [("cipher", (alg, job.serial, job.data),
                               {"iv": job.case.hex("iv"), "aad": job.case.hex("aad"), "decrypt": job.decrypt})
                              for job in jobs])


def _batched(client, alg: str, jobs: list[AeadJob]) -> list:
    """One BATCH per key and direction, all in flight at once; outcomes in job order."""
    groups = defaultdict(list)    # (serial, decrypt) -> indexes into jobs
    for index, job in enumerate(jobs):
        groups[job.serial, job.decrypt].append(index)
    replies = pipelined(client, [
        ("batch", (alg, serial, [jobs[i].data for i in indexes]),
         {"ivs": [jobs[i].case.hex("iv") for i in indexes], "aads": [jobs[i].case.hex("aad") for i in indexes],
          "decrypt": decrypt})
        for (serial, decrypt), indexes in groups.items()])
    outcomes = [None] * len(jobs)
    for indexes, reply in zip(groups.values(), replies):
        for i, outcome in zip(indexes, _batch_outcomes(reply, len(indexes))):
            outcomes[i] = outcome
    return outcomes


def _batch_outcomes(reply, n: int) -> list:
    """A BATCH reply as one outcome per item: output bytes or the item's KeydenError."""
    if isinstance(reply, Exception):
        return [reply] * n
    statuses, outputs = reply
    assert len(statuses) == len(outputs) == n, "BATCH answered a different number of items"
    return [out if status == 0 else _fault_if_internal(E.error_for_code(status))
            for status, out in zip(statuses, outputs)]


@pytest.mark.parametrize("filename,alg", [("aes_gcm_test.json", "gcm(aes)"),
                                          ("chacha20_poly1305_test.json", "rfc7539(chacha20,poly1305)"),
                                          ("aes_gcm_siv_test.json", "gcm-siv(aes)")])
def test_aead_vectors_through_daemon(client, filename, alg):
    """Keys as logon keys; each case through the one-shot CIPHER op and through BATCH."""
    tally = wycheproof.Tally(filename)
    cases = list(wycheproof.load("Cipher", filename))
    serials = add_each(client, "logon", "test:k", [case.hex("key") for case in cases])
    jobs = [job for case in cases for job in _aead_jobs(case, serials[case.hex("key")])]
    for path, outcomes in (("cipher", _one_shot(client, alg, jobs)), ("batch", _batched(client, alg, jobs))):
        for job, outcome in zip(jobs, outcomes):
            label, nonce_size = f"{path} {job.direction}", len(job.case.hex("iv"))
            if nonce_size != 12:
                # Policy: 12-byte nonces only (the kernel's gcm(aes) IV size; the only ChaCha20-Poly1305 one).
                if not isinstance(outcome, E.EINVAL):
                    tally.fail(job.case, f"{label}: {nonce_size}-byte nonce not refused with EINVAL: {outcome!r}")
                tally.count(f"{label} nonce-refused")
            else:
                tally.judge(job.case, outcome, job.expected, E.EBADMSG, label=label)

    twelve = [case for case in cases if len(case.hex("iv")) == 12]
    valid, invalid = sum(c.result == "valid" for c in twelve), sum(c.result == "invalid" for c in twelve)
    odd_nonce = len(cases) - len(twelve)
    assert valid >= 100 and invalid >= 20, (valid, invalid)
    tally.check({f"{path} {label}": n for path in ("cipher", "batch") for label, n in (
        ("encrypt valid-accepted", valid), ("decrypt valid-accepted", valid), ("decrypt invalid-rejected", invalid),
        ("encrypt nonce-refused", odd_nonce), ("decrypt nonce-refused", odd_nonce))})


# ---------------------------------------------------------------------------
# Session keys: ECDH, X25519 and HKDF into logon keys, checked by MAC


def _probe(secret: bytes) -> bytes:
    return hmac.new(secret, PROBE, hashlib.sha256).digest()


def derive_and_probe(client, derive_calls: list[tuple[str, tuple, dict]]) -> list:
    """Run derive/kdf calls; each outcome is HMAC-SHA256(PROBE) under the new key, or the exception.

    Derived keys are logon keys, unreadable by design: a MAC keyden computes
    with one is how a test sees what it holds.  Each call needs a description
    of its own, or the next key of the same description replaces it in @s.
    """
    derived = pipelined(client, derive_calls)
    made = [serial for serial in derived if isinstance(serial, int)]
    macs = dict(zip(made, call_many(client, [("mac", ("hmac(sha256)", serial, PROBE)) for serial in made])))
    outcomes = []
    for serial in derived:
        if not isinstance(serial, int):
            outcomes.append(serial)
        elif isinstance(macs[serial], Exception):
            outcomes.append(Fault(f"derived key {serial} cannot MAC: {macs[serial]}"))
        else:
            outcomes.append(macs[serial])
    return outcomes


def _every_case_judged(cases) -> dict[str, int]:
    """Tally.check's needs when every valid case must be accepted and every invalid one rejected."""
    needs = {"valid-accepted": sum(c.result == "valid" for c in cases),
             "invalid-rejected": sum(c.result == "invalid" for c in cases)}
    assert all(needs.values()), needs
    return needs


def _pkcs8(private_key) -> bytes:
    return private_key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())


def _agree(client, cases, private_key_of, secret_size: int) -> list:
    """Load each case's private key (PKCS#8), derive with its peer (raw KDF), probe the result.

    ``private_key_of`` makes a pyca private key from the case's "private" hex field.
    """
    der_of = functools.cache(lambda private: _pkcs8(private_key_of(private)))   # files reuse few keys
    ders = [der_of(case.fields["private"]) for case in cases]
    serials = add_each(client, "asymmetric", "", ders)
    return derive_and_probe(client, [
        ("derive", (serials[der], case.hex("public")),
         {"kdf": "raw", "length": len(case.hex("shared")) or secret_size,
          "description": f"test:shared{i}"})
        for i, (case, der) in enumerate(zip(cases, ders))])


EC_FILES = [("ecdh_secp256r1_test.json", ec.SECP256R1(), 32),           # peer as SubjectPublicKeyInfo
            ("ecdh_secp256r1_ecpoint_test.json", ec.SECP256R1(), 32),   # peer as a raw SEC1 point
            ("ecdh_secp384r1_test.json", ec.SECP384R1(), 48)]


@pytest.mark.parametrize("filename,curve,size", EC_FILES, ids=[f[0][:-len("_test.json")] for f in EC_FILES])
def test_ecdh_vectors_through_daemon(client, filename, curve, size):
    tally = wycheproof.Tally(filename)
    cases = list(wycheproof.load("Protocol", filename))
    outcomes = _agree(client, cases, lambda private: ec.derive_private_key(int(private, 16), curve), size)
    for case, outcome in zip(cases, outcomes):
        tally.judge(case, outcome, _probe(case.hex("shared")) if case.fields["shared"] else None, E.EINVAL)
    tally.check(_every_case_judged(cases))


def test_x25519_vectors_through_daemon(client):
    tally = wycheproof.Tally("x25519_test.json")
    cases = list(wycheproof.load("Protocol", "x25519_test.json"))
    outcomes = _agree(client, cases, lambda hex_: x25519.X25519PrivateKey.from_private_bytes(bytes.fromhex(hex_)), 32)
    for case, outcome in zip(cases, outcomes):
        if "ZeroSharedSecret" in case.flags:
            # Policy: a low-order peer (all-zero secret) is refused, never turned into a key.
            if not isinstance(outcome, E.EINVAL):
                tally.fail(case, f"all-zero secret not refused with EINVAL: {outcome!r}")
            tally.count("zero-secret-refused")
        else:
            tally.judge(case, outcome, _probe(case.hex("shared")), E.EINVAL)
    zero = [case for case in cases if "ZeroSharedSecret" in case.flags]
    others = [case for case in cases if "ZeroSharedSecret" not in case.flags]
    assert len(zero) >= 25, len(zero)
    # Every other case, "acceptable" ones too (unusual public values), must give its secret.
    tally.check({"valid-accepted": sum(c.result == "valid" for c in others),
                 "acceptable-accepted": sum(c.result == "acceptable" for c in others),
                 "zero-secret-refused": len(zero)})


@pytest.mark.parametrize("hash_name", ["sha256", "sha384"])
def test_hkdf_vectors_through_daemon(client, hash_name):
    """The input keying material is a logon key; the invalid cases ask for more than 255 * the hash's size.
    A key keyden makes is at most MAX_KDF_OUTPUT (HKDF-SHA256's 8160) bytes, whatever the hash: SHA-384's
    longer valid outputs are EINVAL (session-keys.md), and counted as such."""
    filename = f"hkdf_{hash_name}_test.json"
    tally = wycheproof.Tally(filename)
    cases = list(wycheproof.load("Protocol", filename))
    serials = add_each(client, "logon", "test:ikm", [case.hex("ikm") for case in cases])
    outcomes = derive_and_probe(client, [
        ("kdf", (serials[case.hex("ikm")],),
         {"kdf": f"hkdf-{hash_name}", "salt": case.hex("salt"), "info": case.hex("info"),
          "length": case.fields["size"], "description": f"test:okm{i}"})
        for i, case in enumerate(cases)])
    over_cap = [case for case in cases if case.result == "valid" and case.fields["size"] > A.MAX_KDF_OUTPUT]
    for case, outcome in zip(cases, outcomes):
        if case in over_cap:
            tally.count("valid-over-keyden's-cap-refused") if isinstance(outcome, E.EINVAL) else \
                tally.fail(case, f"over keyden's {A.MAX_KDF_OUTPUT}-byte cap, yet {outcome!r}")
            continue
        tally.judge(case, outcome, _probe(case.hex("okm")) if case.fields["okm"] else None, E.EINVAL)
    needs = _every_case_judged([case for case in cases if case not in over_cap])
    tally.check({**needs, "valid-over-keyden's-cap-refused": len(over_cap)})
