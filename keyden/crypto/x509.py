"""X.509 trust decisions: who signed a certificate, blacklist hashes, path validation.

Pure code: no key store, no sockets.  Signatures are checked by pyca
(``public_key.verify`` over the certificate's TBS bytes with the padding and
hash the certificate names) and paths are validated by pyca's
``cryptography.x509.verification`` (RFC 5280 / CA-Browser-Forum profile);
this module only picks candidates, words reasons, and maps failures onto
keyden's errno classes.  Messages name subjects, never key material.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import re
from typing import Callable, Container, Iterable, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from cryptography.x509 import verification as V
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from keyden import errors as E

__all__ = ["PURPOSES", "tbs_hash", "bin_hash", "blacklist_descriptions", "signed_by", "signer_candidates",
           "subject_of", "validate"]

PURPOSES = ("server", "client", "")
_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_DNS_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
#: Hashes a certificate signature may use: SHA-1 and MD5 are collision-broken, so never accepted.
_SIGNATURE_HASHES = (hashes.SHA224, hashes.SHA256, hashes.SHA384, hashes.SHA512,
                     hashes.SHA3_256, hashes.SHA3_384, hashes.SHA3_512)


# ---------------------------------------------------------------------------
# blacklist hashes (the kernel's "tbs:" and "bin:" descriptions)


def tbs_hash(cert: x509.Certificate) -> bytes:
    """SHA-256 of the to-be-signed part: what keyden's "tbs:" blacklist entries name."""
    return hashlib.sha256(cert.tbs_certificate_bytes).digest()


def tbs_hashes(cert: x509.Certificate) -> list[bytes]:
    """The "tbs:" hashes that name this certificate: SHA-256, and (as the kernel computes it) the hash of
    the certificate's own signature algorithm, so a blacklist copied from a kernel's matches too."""
    found = [tbs_hash(cert)]
    try:
        own = cert.signature_hash_algorithm
    except (UnsupportedAlgorithm, ValueError):  # ValueError: RSASSA-PSS parameters pyca cannot read
        own = None
    if own is not None and not isinstance(own, hashes.SHA256):
        try:
            digest = hashes.Hash(own)
            digest.update(cert.tbs_certificate_bytes)
            found.append(digest.finalize())
        except UnsupportedAlgorithm:
            pass
    return found


def bin_hash(cert: x509.Certificate | None, spki_der: bytes = b"") -> bytes:
    """SHA-256 of the whole DER certificate, or of the SubjectPublicKeyInfo for a bare key ("bin:")."""
    blob = cert.public_bytes(serialization.Encoding.DER) if cert is not None else spki_der
    return hashlib.sha256(blob).digest()


#: Finite-field DH (PKCS #3 dhKeyAgreement, X9.42 dhpublicnumber): loading such a key, pyca runs OpenSSL's
#: DH_check on its group, primality tests that hold the GIL, and so every thread of the daemon, for seconds
#: on a 4096-bit prime anyone may choose.  keyden holds no such key, so none is ever loaded.
DH_KEY_OIDS = frozenset({"1.2.840.113549.1.3.1", "1.2.840.10046.2.1"})


def public_key_of(cert: x509.Certificate):
    """``cert.public_key()``, but UnsupportedAlgorithm for a DH key, which it does not load."""
    if cert.public_key_algorithm_oid.dotted_string in DH_KEY_OIDS:
        raise UnsupportedAlgorithm("finite-field DH keys are not loaded")
    return cert.public_key()


def spki_of(cert: x509.Certificate) -> bytes:
    """The certificate's key as SubjectPublicKeyInfo DER, as a bare key of it is hashed; b"" if pyca
    cannot load the key (OpenSSL took it in a TLS handshake), or keyden does not (DH)."""
    try:
        return public_key_of(cert).public_bytes(serialization.Encoding.DER,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
    except (ValueError, UnsupportedAlgorithm):
        return b""


def blacklist_descriptions(cert: x509.Certificate | None, spki_der: bytes = b"", twins: bool = True) -> list[str]:
    """Every blacklist description that would refuse this certificate or bare key.  A certificate is
    named by its TBS, its DER and its key: blacklisting a key ("bin:" of its SPKI) refuses every
    certificate for that key too.  With ``twins``, an ECDSA-signed certificate is named by the DER of
    its twins as well (``signature_twins``): anyone may make one, and a "bin:" ban must refuse them all."""
    if cert is None:
        return [f"bin:{bin_hash(None, spki_der).hex()}"]
    names = [f"tbs:{digest.hex()}" for digest in tbs_hashes(cert)] + [f"bin:{bin_hash(cert).hex()}"]
    if twins:
        names += [f"bin:{hashlib.sha256(twin).hexdigest()}" for twin in signature_twins(cert)]
    spki_der = spki_der or spki_of(cert)
    return names + ([f"bin:{bin_hash(None, spki_der).hex()}"] if spki_der else [])


#: The orders of the curves an ECDSA signer of a certificate may have: keyden's own (P-256, P-384), and
#: those OpenSSL also verifies in a TLS peer's chain (P-521, secp256k1, brainpool r1).  (SEC 2; RFC 5639)
CURVE_ORDERS = {
    "secp256r1": 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
    "secp384r1": 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973,
    "secp521r1": int("6864797660130609714981900799081393217269435300143305409394463459185543183397655394245057"
                     "746333217197532963996371363321113864768612440380340372808892707005449"),
    "secp256k1": 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141,
    "brainpoolP256r1": 0xA9FB57DBA1EEA9BC3E660A909D838D718C397AA3B561A6F7901E0E82974856A7,
    "brainpoolP384r1": int("8CB91E82A3386D280F5D6F7E50E641DF152F7109ED5456B31F166E6CAC0425A7CF3AB6AF6B7FC3103B8832"
                           "02E9046565", 16),
    "brainpoolP512r1": int("AADD9DB8DBE9C48B3FD4E6AE33C9FC07CB308DB3B3C9D20ED6639CCA70330870553E5C414CA92619418661"
                           "197FAC10471DB1D381085DDADDB58796829CA90069", 16),
}


def signature_twins(cert: x509.Certificate) -> list[bytes]:
    """The other DER encodings of ``cert`` whose signature verifies wherever its own does: for ECDSA, (r, s)
    and (r, n - s) are both valid, so anyone holding a certificate can make its twin (one per curve its
    signer may be on: the certificate does not say which).  RSA and Ed25519 signatures have no such twin
    (OpenSSL refuses s >= n); nor does the DER around them, pyca's parser being strict, but for unused
    bits in the signature's BIT STRING, which the asymmetric parser refuses as OpenSSL does."""
    if not isinstance(_signature_parameters(cert), ec.ECDSA):
        return []
    try:
        r, s = decode_dss_signature(cert.signature)
    except ValueError:
        return []
    der = cert.public_bytes(serialization.Encoding.DER)
    signed = der[_der_content_start(der):len(der) - len(_bit_string(cert.signature))]  # TBS and algorithm
    return [_der_sequence(signed + _bit_string(encode_dss_signature(r, n - s)))
            for n in CURVE_ORDERS.values() if 0 < s < n]


def _signature_parameters(cert: x509.Certificate):
    try:
        return cert.signature_algorithm_parameters
    except (UnsupportedAlgorithm, ValueError):
        return None


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    size = (n.bit_length() + 7) // 8
    return bytes([0x80 | size]) + n.to_bytes(size, "big")


def _der_content_start(der: bytes) -> int:
    return 2 + (der[1] & 0x7F if der[1] & 0x80 else 0)


def _bit_string(content: bytes) -> bytes:
    return b"\x03" + _der_length(len(content) + 1) + b"\x00" + content


def _der_sequence(content: bytes) -> bytes:
    return b"\x30" + _der_length(len(content)) + content


# ---------------------------------------------------------------------------
# who signed a certificate


def signed_by(cert: x509.Certificate, public_key) -> bool:
    """Does ``public_key`` verify ``cert``'s signature, with the padding and hash the certificate names?
    Never for an RSA key whose public exponent is over MAX_RSA_EXPONENT_BITS: its checks take milliseconds
    each, and a keyring restriction runs them with the key store held."""
    tbs, sig = cert.tbs_certificate_bytes, cert.signature
    try:
        params = cert.signature_algorithm_parameters  # ValueError for RSASSA-PSS parameters pyca cannot read
        if isinstance(public_key, ed25519.Ed25519PublicKey):
            if params is not None:
                return False
            public_key.verify(sig, tbs)
            return True
        algorithm = cert.signature_hash_algorithm
        if not isinstance(algorithm, _SIGNATURE_HASHES):
            return False
        if isinstance(public_key, rsa.RSAPublicKey):
            if public_key.public_numbers().e.bit_length() > MAX_RSA_EXPONENT_BITS:
                return False
            public_key.verify(sig, tbs, params, algorithm)
        elif isinstance(public_key, ec.EllipticCurvePublicKey):
            if not isinstance(params, ec.ECDSA):
                return False
            public_key.verify(sig, tbs, params)
        else:
            return False
        return True
    except (InvalidSignature, TypeError, ValueError, UnsupportedAlgorithm):
        return False


def _authority_key_id(cert: x509.Certificate) -> x509.AuthorityKeyIdentifier | None:
    try:
        return cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        return None
    except ValueError:  # a malformed extension names no authority
        return None


def _names_issuer(akid: x509.AuthorityKeyIdentifier | None, cert: x509.Certificate, key_ids: Sequence[bytes],
                  candidate: x509.Certificate | None) -> bool:
    """Does the authority information in ``cert`` point at this candidate key?

    As the kernel's asymmetric key ids: the AKID's key identifier against the
    candidate's ids (its SPKI hash and SKID), else the AKID's issuer and
    serial against the candidate certificate's, else, with no AKID at all,
    the issuer name against the candidate certificate's subject.
    """
    if akid is not None and akid.key_identifier:
        return akid.key_identifier in key_ids
    if candidate is None:
        return False
    if akid is not None and akid.authority_cert_serial_number is not None and akid.authority_cert_issuer:
        issuers = [n.value for n in akid.authority_cert_issuer if isinstance(n, x509.DirectoryName)]
        return (candidate.serial_number == akid.authority_cert_serial_number
                and candidate.issuer in issuers)
    return candidate.subject == cert.issuer


#: Distinct public keys that may claim to be one certificate's issuer (a CA's key and its successor: two or
#: three).  Each costs a signature check, run with the key store held: a keyring of decoys sharing one key
#: ID made every add to a restricted keyring check them all.
MAX_SIGNER_CANDIDATES = 8


def signer_candidates(cert: x509.Certificate, keys: Iterable, banned: Callable[[object], bool] = lambda k: False
                      ) -> list:
    """The keys (ParsedKey-like: ``key_ids``, ``certificate``) that ``cert`` names as its issuer, in order,
    the first of each public key only (copies and renewals of one key need one check; ``key_ids[0]`` is
    the hash of the key), but a copy ``banned`` refuses gives way to a later one it does not: the answer
    does not depend on which was linked first.  EKEYREJECTED past MAX_SIGNER_CANDIDATES, before any
    signature is checked."""
    akid = _authority_key_id(cert)
    by_key: dict[bytes, object] = {}
    for k in keys:
        if _names_issuer(akid, cert, k.key_ids, k.certificate):
            first = by_key.setdefault(k.key_ids[0], k)
            if first is not k and banned(first) and not banned(k):
                by_key[k.key_ids[0]] = k
    found = list(by_key.values())
    if len(found) > MAX_SIGNER_CANDIDATES:
        raise E.EKEYREJECTED(f"{len(found)} trusted keys claim to be the certificate's issuer (at most "
                             f"{MAX_SIGNER_CANDIDATES}): not checked")
    return found


# ---------------------------------------------------------------------------
# path validation


def printable(text: str) -> str:
    """Names from a certificate as one safe line: control, format (bidi) and other unprintable characters
    escaped, so a crafted name cannot forge lines or reorder what a terminal shows."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def subject_of(cert: x509.Certificate) -> str:
    """The subject as RFC 4514 text, printable (see ``printable``)."""
    return printable(cert.subject.rfc4514_string())


def _eku_validator(purpose_oid):
    """An EKU check for every certificate of a path: present EKUs must name ``purpose_oid``.
    anyExtendedKeyUsage does not do, on a CA either, as OpenSSL (and so keyden's TLS) decides; pyca's
    own profiles take it on a CA, so they are never left to decide."""
    def check(policy, cert, eku):
        if eku is not None and purpose_oid not in eku:
            raise ValueError("wrong purpose")
    return check


def _subject(host: str):
    """What a server certificate must name: an IP address, else a DNS name (RFC 1034 labels)."""
    try:
        return V.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if len(host) > 253 or not _DNS_NAME.fullmatch(host):
        raise E.EINVAL(f"{host[:64]!r} is neither a DNS name nor an IP address")
    return V.DNSName(host)


_PURPOSE_EKU = {"server": ExtendedKeyUsageOID.SERVER_AUTH, "client": ExtendedKeyUsageOID.CLIENT_AUTH}


def _verifier(anchors: list[x509.Certificate], at: datetime.datetime, subject, purpose: str):
    """pyca's verifier for this purpose: server (serverAuth EKU), client (clientAuth EKU) or any, with
    the name checked if given (and, for any purpose without one, no subjectAltName required)."""
    builder = V.PolicyBuilder().store(V.Store(anchors)).time(at).max_chain_depth(MAX_DEPTH)
    eku = _eku_validator(_PURPOSE_EKU[purpose]) if purpose else None
    ca_policy, ee_policy = (base().may_be_present(x509.ExtendedKeyUsage, V.Criticality.AGNOSTIC, eku)
                            for base in (V.ExtensionPolicy.webpki_defaults_ca, V.ExtensionPolicy.webpki_defaults_ee))
    if purpose == "" and subject is None:
        ee_policy = ee_policy.may_be_present(x509.SubjectAlternativeName, V.Criticality.AGNOSTIC, None)
    builder = builder.extension_policies(ca_policy=ca_policy, ee_policy=ee_policy)
    if subject is not None:
        return builder.build_server_verifier(subject)
    return builder.build_client_verifier()


def _wildcard_over_one_label(leaf: x509.Certificate, subject) -> bool:
    """Whether only a wildcard over a single label (``*.com``) named the host pyca matched: pyca takes
    one, OpenSSL (and so keyden's TLS) does not.  A two-label host matched by no SAN of its own can only
    have been matched by one."""
    if not isinstance(subject, V.DNSName) or subject.value.count(".") != 1:
        return False
    return subject.value.lower() not in (n.lower() for n in _sans(leaf, x509.DNSName))


_IA5 = getattr(getattr(x509.name, "_ASN1Type", None), "IA5String", None)


class _Unsupported(Exception):
    """A name a name constraint cannot be checked against (OpenSSL's X509_V_ERR_UNSUPPORTED_NAME_SYNTAX):
    refused, where a constraint of its kind applies."""


def _within(name: str, constraint: str, kind) -> bool:
    """OpenSSL's nc_dns and nc_email: a DNS name in a constraint's domain (itself or below it; below only,
    for ".domain"); a mail address that is the constraint ("box@domain"), or at its domain ("domain",
    "@domain"), or below it (".domain"), case aside but for a mailbox's local part."""
    if kind is x509.DNSName:
        name, constraint = name.lower(), constraint.lower()
        if not constraint or constraint.startswith("."):
            return name.endswith(constraint)
        return name == constraint or name.endswith("." + constraint)
    if not isinstance(name, str) or "@" not in name or not name.isascii():
        raise _Unsupported()
    local, _, host = name.rpartition("@")
    if "@" not in constraint and constraint.startswith("."):
        return name.lower().endswith(constraint.lower())
    c_local, _, c_host = constraint.rpartition("@")
    return (not c_local or local == c_local) and host.lower() == c_host.lower()


def _dns_id(cn: str) -> str | None:
    """OpenSSL's cn2dnsid: the common name as a host name, or None if it does not look like one (letters,
    digits and "_", with "-" and "." inside, no "." next to "." or "-", two labels at least).  Trailing
    NULs are dropped first; one inside cannot be checked: _Unsupported."""
    cn = cn.rstrip("\0")
    if "\0" in cn:
        raise _Unsupported()
    dots = 0
    for i, c in enumerate(cn):
        if c.isascii() and (c.isalnum() or c == "_"):
            continue
        if not 0 < i < len(cn) - 1:
            return None
        if c == "-":
            continue
        if c == "." and cn[i + 1] not in ".-" and cn[i - 1] != "-":
            dots += 1
            continue
        return None
    return cn if dots else None


def _subject_names(cert: x509.Certificate, leaf: bool) -> list[tuple[str | bytes, type]]:
    """The names in a subject that name constraints govern besides the subjectAltName: its emailAddress
    attributes and, for a leaf with no DNS subjectAltName, its host-like common names (cut at trailing
    NULs).  _Unsupported, as OpenSSL refuses them under any name constraint: an emailAddress that is no
    IA5String, a common name with a NUL inside."""
    names: list[tuple[str | bytes, type]] = []
    for attribute in cert.subject.get_attributes_for_oid(NameOID.EMAIL_ADDRESS):
        if _IA5 is not None and getattr(attribute, "_type", _IA5) is not _IA5:  # (pyca's only record of it)
            raise _Unsupported()
        names.append((attribute.value, x509.RFC822Name))
    if leaf and not _sans(cert, x509.DNSName):
        for attribute in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
            host = _dns_id(attribute.value) if isinstance(attribute.value, str) else None
            if host is not None:
                names.append((host, x509.DNSName))
    return names


def _subject_name_outside(chain: Sequence[x509.Certificate]) -> str | None:
    """Why a name in a subject breaks an issuer's name constraints, or None.  pyca checks the
    subjectAltName only; OpenSSL (and so keyden's TLS) also checks subjects (``_subject_names``), below
    each issuer but self-issued intermediates, as nc_match does: within a permitted subtree of its kind
    if there are any, within no excluded one."""
    for at, issuer in enumerate(chain[1:], 1):
        try:
            constraints = issuer.extensions.get_extension_for_class(x509.NameConstraints).value
        except (x509.ExtensionNotFound, ValueError):
            continue
        subtrees = {kind: ([t.value for t in constraints.permitted_subtrees or () if isinstance(t, kind)],
                           [t.value for t in constraints.excluded_subtrees or () if isinstance(t, kind)])
                    for kind in (x509.DNSName, x509.RFC822Name)}
        for index, cert in enumerate(chain[:at]):
            if index and cert.subject == cert.issuer:
                continue  # self-issued: RFC 5280 and OpenSSL leave it out
            try:
                names = _subject_names(cert, leaf=index == 0)
            except _Unsupported:
                return "a name no name constraint can be checked against (an emailAddress not IA5String, a NUL)"
            for name, kind in names:
                permitted, excluded = subtrees[kind]
                try:
                    if permitted and not any(_within(name, c, kind) for c in permitted):
                        return f"{printable(name[:253])!r}, outside the subtrees an issuer's name constraints permit"
                    if any(_within(name, c, kind) for c in excluded):
                        return f"{printable(name[:253])!r}, in a subtree an issuer's name constraints exclude"
                except _Unsupported:
                    return "an emailAddress that is no mail address, under an issuer's mail name constraints"
    return None


def _sans(cert: x509.Certificate, kind) -> list:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(kind)
    except (x509.ExtensionNotFound, ValueError):
        return []


#: pyca's VerificationError texts (substrings) and what they mean, first match wins.
_REASONS = (
    ("no matching subjectAltName", "hostname mismatch: the certificate is not valid for {host}"),
    ("required EKU not found", "wrong purpose: the certificate's extended key usage does not allow {purpose} use"),
    ("wrong purpose", "wrong purpose: the certificate's extended key usage does not allow {purpose} use"),
    ("2.5.29.17: Certificate is missing required extension", _NO_SAN := "no subjectAltName: the certificate "
     "names no host or identity"),
    ("has no subjectAltName", _NO_SAN),
    ("signature does not match", "bad signature: the issuer's key did not sign the certificate"),
    ("Forbidden signature algorithm", "weak or unsupported signature algorithm in the chain (SHA-1, MD5 and "
     "algorithms outside the Web PKI profile are refused)"),
    ("Forbidden public key algorithm", "unsupported public key algorithm in the chain (the Web PKI profile "
     "takes RSA of 2048 bits and more, and ECDSA P-256, P-384 and P-521)"),
    ("exceeds max depth", "no path: the chain would be longer than 8 intermediates, or loops"),
    ("maximum signature check limit", "no path within pyca's limit of signature checks: certificates in the "
     "chain keyring name one another as issuers, or too many could issue"),
    ("name constraint", "name constraints: a certificate in the chain names what an issuer's name "
     "constraints exclude, or too many names to check"),
    ("all candidates exhausted with no interior errors", "unknown issuer: no trusted certificate issued it"),
    ("not valid at validation time", "a certificate in the chain is expired or not yet valid"),
)
#: What pyca appends naming the certificate it was at: a Python repr, not for users.
_ENCOUNTERED = re.compile(r"\s*\(encountered processing <Certificate\(.*\)>\)\s*$", re.S)


def _reason(message: str, host: str, purpose: str) -> str:
    """pyca's VerificationError text, reworded where it has a plain meaning; anything else without pyca's
    internal reprs, on one printable line."""
    for needle, reason in _REASONS:
        if needle in message:
            return reason.format(host=printable(host[:253]), purpose=purpose)
    message = _ENCOUNTERED.sub("", message.removeprefix("validation failed: "))
    message = message.removeprefix("candidates exhausted: ")
    if "{" in message or "PhantomData" in message:  # a Rust debug dump: nothing a user can act on
        return "the chain does not validate under the Web PKI profile"
    return printable(message)[:300]


def _time_reason(cert: x509.Certificate, at: datetime.datetime) -> str | None:
    if at < cert.not_valid_before_utc:
        return f"certificate is not yet valid (valid from {cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ})"
    if at > cert.not_valid_after_utc:
        return f"certificate has expired (valid until {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ})"
    return None


#: Name-constraint checks (a leaf name against an issuer's subtree) one validation may need.  pyca stops
#: at its own limit of about a million, but holds the interpreter lock meanwhile (~0.5 s here), which
#: stalls every other client.  Real chains need a few thousand at most.
MAX_NAME_CHECKS = 1 << 16


def _names_in(cert: x509.Certificate) -> int:
    try:
        return len(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except (x509.ExtensionNotFound, ValueError):
        return 0


def _subtrees_in(cert: x509.Certificate) -> int:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.NameConstraints).value
    except (x509.ExtensionNotFound, ValueError):
        return 0
    return len(constraints.permitted_subtrees or ()) + len(constraints.excluded_subtrees or ())


def _check_name_constraint_cost(leaf: x509.Certificate, issuers: Iterable[x509.Certificate]) -> None:
    """EKEYREJECTED before pyca starts, if the names below the issuers' name constraints could take more
    than MAX_NAME_CHECKS comparisons.  The path is not known yet, so every candidate counts: the leaf's
    and every issuer's names (and subjects) against every issuer's constraints."""
    issuers = set(issuers)
    names = sum(_names_in(c) + 1 + len(c.subject) for c in (leaf, *issuers))  # (each subject, and its names)
    subtrees = sum(_subtrees_in(c) for c in issuers)
    if names * subtrees > MAX_NAME_CHECKS:
        raise E.EKEYREJECTED(f"name constraints too costly to check: {names} names in the chain's "
                             f"certificates against {subtrees} name constraints "
                             f"(at most {MAX_NAME_CHECKS} comparisons)")


#: Path search.  pyca's builder tries, depth first, every candidate issuer of every certificate on the
#: way up (every anchor and intermediate whose subject is that certificate's issuer), a signature check
#: each, to its depth limit, and remembers nothing that failed.  Certificates that name one another as
#: issuers (self-issued ones under one name; X issued by Y beside Y issued by X) are tried again at
#: every step: up to c + c**2 + ... + c**9 checks for c of them under each name.  Three self-issued
#: P-256 certificates with one subject and key took 3 s here, four 44 s; five would take minutes, eight
#: hours (slower keys: five times that), on a worker thread nothing can stop.  So the candidates are
#: bounded before pyca starts.
#: pyca's depth limit (intermediates in a path), set here so the bound below counts what pyca does.
MAX_DEPTH = 8
#: Intermediates under one subject name (renewed and cross-signed CAs: one or two in real PKIs).
MAX_SAME_SUBJECT = 4
#: Intermediates a path could use at all, and anchors (a CA bundle holds about 150).
MAX_INTERMEDIATES, MAX_ANCHORS = 64, 1024
#: Signature checks the search could take at worst, counted below before pyca starts.  A real path
#: needs a few dozen; 1024 of the slowest keys allowed (P-384; RSA-3072 with a 256-bit exponent)
#: take about a second here.
MAX_SIGNATURE_CHECKS = 1024
#: An RSA key checks a signature in time growing with its public exponent's size: OpenSSL takes any
#: exponent up to 3072-bit moduli (7 ms a check at 3000 bits, 100 us at 17).  The CA/Browser Forum's
#: bound (2**256 - 1) keeps every check near a millisecond.
MAX_RSA_EXPONENT_BITS = 256


def _unique(certs: Iterable[x509.Certificate]) -> list[x509.Certificate]:
    """Each certificate once (equal DER), in the order given: pyca tries candidates in that order."""
    return list(dict.fromkeys(certs))


def _path_candidates(leaf: x509.Certificate, anchors: Container[x509.Certificate],
                     intermediates: list[x509.Certificate]) -> list[x509.Certificate]:
    """The intermediates pyca could put on a path from ``leaf``: those named as the issuer of the leaf
    or of another such intermediate, leaving out anchors (pyca ends a path at an anchor, so one is never
    followed further as an intermediate).  Names compare as pyca's (byte for byte) or more loosely (any
    string type), so nothing pyca could use is left out."""
    pool = [c for c in _unique(intermediates) if c not in anchors]
    named: dict[x509.Name, list[x509.Certificate]] = {}
    for cert in pool:
        named.setdefault(cert.subject, []).append(cert)
    issuers, queue = {leaf.issuer}, [leaf.issuer]
    while queue:
        for cert in named.get(queue.pop(), ()):
            if cert.issuer not in issuers:
                issuers.add(cert.issuer)
                queue.append(cert.issuer)
    return [c for c in pool if c.subject in issuers]


def _rsa_exponent_bits(cert: x509.Certificate) -> int:
    try:
        key = public_key_of(cert)
    except (ValueError, UnsupportedAlgorithm):
        return 0
    return key.public_numbers().e.bit_length() if isinstance(key, rsa.RSAPublicKey) else 0


def _check_path_search_cost(leaf: x509.Certificate, anchors: list[x509.Certificate],
                            intermediates: list[x509.Certificate]) -> None:
    """EKEYREJECTED before pyca starts, if its path search could take too long (see MAX_SIGNATURE_CHECKS).

    ``intermediates`` are the candidates (``_path_candidates``).  The search is counted as pyca runs it,
    each check as if it passed and led on: at a certificate with issuer N (the leaf at depth 0, up to
    depth MAX_DEPTH), a check for each anchor and intermediate named N, then the search on from each
    such intermediate one deeper.  That depends on N and the depth alone, so it is counted once each.
    """
    if len(anchors) > MAX_ANCHORS:
        raise E.EKEYREJECTED(f"too many certificates in the trust keyring ({len(anchors)}; at most {MAX_ANCHORS})")
    named: dict[x509.Name, list[x509.Certificate]] = {}
    for cert in intermediates:
        named.setdefault(cert.subject, []).append(cert)
    for subject, group in named.items():
        if len(group) > MAX_SAME_SUBJECT:
            raise E.EKEYREJECTED(f"too many certificates named {printable(subject.rfc4514_string())} in the chain "
                                 f"keyring ({len(group)} that could issue on this path; at most {MAX_SAME_SUBJECT})")
    if len(intermediates) > MAX_INTERMEDIATES:
        raise E.EKEYREJECTED(f"too many certificates in the chain keyring could issue on this path "
                             f"({len(intermediates)}; at most {MAX_INTERMEDIATES})")
    issuers = {leaf.issuer, *(c.issuer for c in intermediates)}
    candidates, anchors_named = list(intermediates), dict.fromkeys(issuers, 0)
    for cert in anchors:
        subject = cert.subject
        if subject in issuers:
            candidates.append(cert)
            anchors_named[subject] += 1
    for cert in candidates:
        bits = _rsa_exponent_bits(cert)
        if bits > MAX_RSA_EXPONENT_BITS:
            raise E.EKEYREJECTED(f"{subject_of(cert)} has an RSA public exponent of {bits} bits (at most "
                                 f"{MAX_RSA_EXPONENT_BITS}): checking its signatures would take too long")
    counted: dict[tuple[x509.Name, int], int] = {}

    def checks(issuer: x509.Name, depth: int) -> int:
        if depth > MAX_DEPTH:  # pyca stops there before looking for issuers
            return 0
        if (issuer, depth) not in counted:
            group = named.get(issuer, ())
            counted[issuer, depth] = anchors_named[issuer] + len(group) + sum(
                checks(c.issuer, depth + 1) for c in group)
        return counted[issuer, depth]

    total = checks(leaf.issuer, 0)
    if total > MAX_SIGNATURE_CHECKS:
        most = max(named.items(), key=lambda item: len(item[1]), default=None)
        where = f"; {len(most[1])} named {printable(most[0].rfc4514_string())}" if most else ""
        raise E.EKEYREJECTED(f"path search too costly: pyca could try {total} signature checks (at most "
                             f"{MAX_SIGNATURE_CHECKS}) over certificates in the chain keyring that name one "
                             f"another as issuers{where}")


def validate(leaf: x509.Certificate, anchors: list[x509.Certificate], intermediates: list[x509.Certificate],
             at: float, host: str = "", purpose: str = "") -> list[x509.Certificate]:
    """The validated chain, leaf first and trust anchor last; EKEYREJECTED with the reason if there is none.

    ``at`` is a Unix time.  ``purpose`` is "server", "client" or "" (any);
    ``host`` (a DNS name or IP address) is checked against the leaf's
    subjectAltName.  Algorithms and extensions follow pyca's Web PKI
    profile (so Ed25519 and SHA-1 certificates do not validate).
    """
    if purpose not in PURPOSES:
        raise E.EINVAL("purpose must be 'server', 'client' or empty")
    if purpose == "client" and host:
        raise E.EINVAL("a host name applies to server certificates only")
    subject = _subject(host) if host else None
    try:
        when = datetime.datetime.fromtimestamp(at, datetime.timezone.utc)
    except (OverflowError, OSError, ValueError):
        raise E.EINVAL("time out of range") from None
    too_early_or_late = _time_reason(leaf, when)
    if too_early_or_late:
        raise E.EKEYREJECTED(too_early_or_late)
    if not anchors:
        raise E.EKEYREJECTED("unknown issuer: the trust keyring holds no usable certificates")
    anchored = dict.fromkeys(anchors)  # each once (equal DER), in order: pyca tries candidates in that order
    anchors = list(anchored)
    if leaf in anchored:  # pinned: pyca ends the path at the leaf itself
        intermediates = []
    else:
        intermediates = _path_candidates(leaf, anchored, intermediates)
        _check_path_search_cost(leaf, anchors, intermediates)
    _check_name_constraint_cost(leaf, [*anchors, *intermediates])
    try:
        verifier = _verifier(anchors, when, subject, purpose)
    except ValueError:
        raise E.EINVAL(f"{host[:64]!r} is not a host name pyca accepts") from None
    try:
        result = verifier.verify(leaf, intermediates)
    except V.VerificationError as exc:
        raise E.EKEYREJECTED(_reason(str(exc), host, purpose)) from None
    except ValueError:  # pyca refusing an extension it cannot decode
        raise E.EKEYREJECTED("a certificate in the chain is malformed") from None
    chain = list(result.chain if isinstance(result, V.VerifiedClient) else result)
    if _wildcard_over_one_label(leaf, subject):
        raise E.EKEYREJECTED(_reason("no matching subjectAltName", host, purpose))
    outside = _subject_name_outside(chain)
    if outside is not None:
        raise E.EKEYREJECTED(f"name constraints: a subject in the chain names {outside}")
    return chain
