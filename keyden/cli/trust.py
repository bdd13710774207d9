"""keyden's own trust commands: ``x509_verify`` (path validation by the daemon) and ``x509_hashes``.

Restrictions and the blacklist need no commands of their own: they are
keyctl's ``restrict_keyring RING asymmetric key_or_keyring:SERIAL[:chain]``
and ``padd blacklist tbs:<hex> %:.blacklist < /dev/null``.  ``x509_hashes``
prints the two blacklist descriptions of a key, ready for the latter.
"""

from __future__ import annotations

import datetime

from keyden import errors as E
from keyden.cli.support import Context, Exit, Usage, arguments, call, options

LAST_SECOND = 253402300799  # 9999-12-31T23:59:59Z: the last time X.509's GeneralizedTime can name
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
PURPOSES = ("server", "client", "")  # keyden.crypto.x509's; not imported, so other commands start fast


def unix_time(text: str) -> int:
    """--at: Unix seconds, or an ISO 8601 date/time (UTC unless it names a zone)."""
    shown = text if len(text) <= 32 else text[:32] + "..."
    digits = text[1:] if text.startswith("-") else text
    if digits.isascii() and digits.isdigit():  # (isdigit alone takes '²' and other scripts' digits)
        if text.startswith("-") and digits.strip("0"):
            raise Exit(2, f"Time before 1970: '{shown}'")
        digits = digits.lstrip("0") or "0"  # (int() refuses more than 4300 digits, zeros too)
        if len(digits) > 12 or int(digits) > LAST_SECOND:
            raise Exit(2, f"Out of range time: '{shown}' (0 to {LAST_SECOND}, the end of the year 9999)")
        return int(digits)
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise Exit(2, f"Unparsable time: '{shown}' (use Unix seconds or ISO 8601)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    # Whole seconds since the epoch, rounded down (a fraction of a second before 1970 is before it too),
    # counted exactly: a float timestamp rounds 9999-12-31T23:59:59.99999 up past the last second.
    seconds = (when - _EPOCH) // datetime.timedelta(seconds=1)
    if seconds < 0:
        raise Exit(2, f"Time before 1970: '{shown}'")
    if seconds == 0:  # which --at takes for now
        raise Exit(2, f"Time in the epoch's first second: '{shown}' (0 means now; no certificate in use was "
                      "valid then)")
    if seconds > LAST_SECOND:  # (the year 9999 in another zone)
        raise Exit(2, f"Out of range time: '{shown}' (0 to {LAST_SECOND}, the end of the year 9999)")
    return seconds


def cmd_x509_verify(ctx: Context, args: list[str]):
    opts, words = options(args, valued=("--chain", "--host", "--purpose", "--at"), anywhere=True)
    if len(words) != 2:
        raise Usage()
    purpose = opts.get("--purpose", "")
    if purpose not in PURPOSES:
        raise Exit(2, f"Unknown purpose: '{purpose}' (use server or client)")
    cert, trusted = ctx.key(words[0]), ctx.key(words[1])
    chain = ctx.key(opts["--chain"]) if "--chain" in opts else 0
    at = unix_time(opts["--at"]) if "--at" in opts else 0
    try:
        path = ctx.client.x509_verify(cert, trusted, chain, host=opts.get("--host", ""), purpose=purpose, at=at)
    except E.KeydenError as exc:
        raise Exit(1, f"x509_verify: {exc.message}") from None
    print("OK")
    for serial, subject in path:
        print(f"{serial:9d} {subject}")


def cmd_x509_hashes(ctx: Context, args: list[str]):
    args = arguments(args)
    if len(args) != 1:
        raise Usage()
    key = ctx.key(args[0])
    spki, der = call("x509_hashes", ctx.client.public_key_bytes, key)
    from cryptography import x509

    from keyden.crypto.x509 import blacklist_descriptions

    cert = x509.load_der_x509_certificate(der) if der else None
    for description in blacklist_descriptions(cert, spki, twins=False):  # (a ban refuses the twins too)
        print(description)
