"""The interception CA in certs_dir: created as mitmproxy would, or a corporate sub-CA.

Files follow mitmproxy's names so mitmproxy loads them unchanged:

    mitmproxy-ca.pem        private key + CA certificate (+ chain): the signing CA (secret)
    mitmproxy-ca.p12        the same as PKCS#12 (secret)
    mitmproxy-ca-cert.pem   the CA certificate clients must trust (PEM)
    mitmproxy-ca-cert.cer   the same bytes, for Android
    mitmproxy-ca-cert.p12   the certificate as PKCS#12, for Windows
    mitmproxy-dhparam.pem   DH parameters
"""

from __future__ import annotations

import datetime
import logging
import shutil
import sys
from pathlib import Path

from ..catalog.config import CaConfig
from ..fileio import write_atomic

log = logging.getLogger("residency_gate")

__all__ = ["BASENAME", "CaError", "install_subca", "load_or_create_ca"]

BASENAME = "mitmproxy"
KEY_SIZE = 2048


class CaError(Exception):
    """A user-facing error: printed as one line, exit status 1."""


def load_or_create_ca(certs_dir: Path, names: CaConfig | None = None, *, quiet: bool = False):
    """mitmproxy's CertStore for certs_dir, creating the CA the way mitmproxy does, but
    named as the config says (`ca:`), so that people recognise it in their trust store.

    An existing CA is loaded as it is (clients already trust it); when its subject is not
    the configured one, a warning says how to get the new name.
    """
    from mitmproxy.certs import CertStore

    names = names or CaConfig()
    ca_file = certs_dir / f"{BASENAME}-ca.pem"
    created = not ca_file.exists()
    try:
        if created:
            CertStore.create_store(certs_dir, BASENAME, KEY_SIZE,
                                   organization=names.organization, cn=names.common_name)
        store = CertStore.from_store(certs_dir, BASENAME, KEY_SIZE)
    except OSError as e:
        raise CaError(f"cannot use certs dir {certs_dir}: {e.strerror or e}") from None
    except Exception as e:
        raise CaError(f"cannot load the CA in {ca_file}: {e}") from None
    cert = store.default_ca.to_cryptography()
    subject = (store.default_ca.organization, store.default_ca.cn)
    if created:
        if not quiet:
            print(f"residency-gate ca: created a new interception CA in {certs_dir} "
                  f"(CN={names.common_name}, O={names.organization})", file=sys.stderr)
    elif subject != (names.organization, names.common_name) and cert.issuer == cert.subject:
        # a generated CA under other names (a sub-CA from the PKI has its own: no warning)
        log.warning("the interception CA in %s is named CN=%s, O=%s, not as `ca:` says "
                    "(CN=%s, O=%s); names apply when a CA is created: move the mitmproxy-ca* "
                    "files away, start again, and give clients the new CA",
                    certs_dir, subject[1], subject[0], names.common_name, names.organization)
    return store


# ---------------------------------------------------------------------------
# sub-CA installation


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CaError(f"{what} {path}: no such file") from None
    except OSError as e:
        raise CaError(f"{what} {path}: {e.strerror or e}") from None


def _load_certs(path: Path, what: str) -> list:
    from cryptography import x509

    raw = _read(path, what)
    try:
        if b"-----BEGIN" in raw:
            certs = x509.load_pem_x509_certificates(raw)
        else:
            certs = [x509.load_der_x509_certificate(raw)]
    except ValueError:
        raise CaError(f"{what} {path}: not a PEM or DER X.509 certificate") from None
    if not certs:
        raise CaError(f"{what} {path}: no certificate found")
    return certs


def _load_key(path: Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    raw = _read(path, "key")
    try:
        if b"-----BEGIN" in raw:
            key = serialization.load_pem_private_key(raw, password=None)
        else:
            key = serialization.load_der_private_key(raw, password=None)
    except TypeError:
        raise CaError(
            f"key {path} is encrypted; decrypt it first "
            f"(openssl pkey -in {path} -out key.pem) and keep the result private"
        ) from None
    except Exception as e:
        if "BEGIN CERTIFICATE" in raw.decode("latin-1") and b"PRIVATE KEY" not in raw:
            raise CaError(f"key {path}: this is a certificate, not a private key") from None
        raise CaError(f"key {path}: not a readable private key ({type(e).__name__})") from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise CaError(
            f"key {path}: {type(key).__name__.lstrip('_')} keys are not supported; "
            "mitmproxy needs an RSA or EC key"
        )
    return key


def _describe(cert) -> str:
    return cert.subject.rfc4514_string() or "(empty subject)"


def _check_ca_cert(cert, path: Path) -> list[str]:
    """Refuse a certificate that cannot sign; return warnings."""
    from cryptography import x509

    warnings: list[str] = []
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise CaError(
            f"certificate {path} ({_describe(cert)}) has no basicConstraints extension; "
            "a sub-CA needs basicConstraints CA:TRUE"
        ) from None
    except ValueError as e:
        raise CaError(f"certificate {path}: malformed extensions ({e})") from None
    if not bc.ca:
        raise CaError(
            f"certificate {path} ({_describe(cert)}) is not a CA certificate "
            "(basicConstraints CA:FALSE); ask your PKI team for a sub-CA with CA:TRUE"
        )
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        if not ku.key_cert_sign:
            raise CaError(
                f"certificate {path} ({_describe(cert)}) may not sign certificates "
                "(keyUsage lacks keyCertSign)"
            )
    except x509.ExtensionNotFound:
        pass
    if bc.path_length is not None and bc.path_length > 0:
        pass  # fine: may sign further CAs, we only sign leaves
    now = datetime.datetime.now(datetime.UTC)
    if cert.not_valid_after_utc <= now:
        raise CaError(
            f"certificate {path} ({_describe(cert)}) expired on {cert.not_valid_after_utc:%Y-%m-%d}"
        )
    if cert.not_valid_before_utc > now:
        raise CaError(
            f"certificate {path} ({_describe(cert)}) is not valid before "
            f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
        )
    if cert.not_valid_after_utc - now < datetime.timedelta(days=30):
        warnings.append(
            f"warning: the sub-CA expires on {cert.not_valid_after_utc:%Y-%m-%d}; plan its renewal"
        )
    return warnings


def _same_key(cert, key) -> bool:
    from cryptography.hazmat.primitives import serialization

    def spki(pub) -> bytes:
        return pub.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    return spki(cert.public_key()) == spki(key.public_key())


def install_subca(
    certs_dir: Path,
    cert_path: Path,
    key_path: Path,
    *,
    chain: Path | None = None,
    force: bool = False,
) -> list[str]:
    """Validate and install a sub-CA; returns the lines to print. Raises CaError."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.serialization import pkcs12

    certs = _load_certs(cert_path, "certificate")
    cert, extra = certs[0], certs[1:]
    if chain is not None:
        extra += _load_certs(chain, "chain")
    key = _load_key(key_path)
    warnings = _check_ca_cert(cert, cert_path)
    if not _same_key(cert, key):
        raise CaError(
            f"key {key_path} does not match certificate {cert_path} ({_describe(cert)}); "
            "the public keys differ"
        )

    ca_file = certs_dir / f"{BASENAME}-ca.pem"
    targets = [
        ca_file,
        certs_dir / f"{BASENAME}-ca.p12",
        certs_dir / f"{BASENAME}-ca-cert.pem",
        certs_dir / f"{BASENAME}-ca-cert.cer",
        certs_dir / f"{BASENAME}-ca-cert.p12",
    ]
    if ca_file.exists() and not force:
        raise CaError(
            f"{ca_file} already exists (an interception CA is installed); "
            "pass --force to replace it (the old files are kept as *.bak)"
        )

    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(
        pem, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    cert_pem = cert.public_bytes(pem)
    chain_pem = b"".join(c.public_bytes(pem) for c in extra)
    name = BASENAME.encode()
    contents = {
        targets[0]: (key_pem + cert_pem + chain_pem, 0o600),
        targets[1]: (
            pkcs12.serialize_key_and_certificates(
                name, key, cert, extra or None, serialization.NoEncryption()
            ),
            0o600,
        ),
        targets[2]: (cert_pem, 0o644),
        targets[3]: (cert_pem, 0o644),
        targets[4]: (
            pkcs12.serialize_key_and_certificates(
                name, None, cert, None, serialization.NoEncryption()
            ),
            0o644,
        ),
    }
    try:
        certs_dir.mkdir(parents=True, exist_ok=True)
        backups = []
        for t in targets:
            if t.exists():
                bak = t.with_name(t.name + ".bak")
                shutil.copy2(t, bak)
                backups.append(bak)
        for path, (data, mode) in contents.items():
            write_atomic(path, data, mode)
        dh = certs_dir / f"{BASENAME}-dhparam.pem"
        if not dh.exists():
            from mitmproxy.certs import DEFAULT_DHPARAM

            write_atomic(dh, DEFAULT_DHPARAM, 0o644)
    except OSError as e:
        raise CaError(f"cannot write to {certs_dir}: {e.strerror or e}") from None

    # prove mitmproxy accepts what we wrote
    try:
        from mitmproxy.certs import CertStore

        CertStore.from_files(ca_file, certs_dir / f"{BASENAME}-dhparam.pem")
    except Exception as e:  # pragma: no cover - we validated above
        raise CaError(f"mitmproxy cannot load the installed CA: {e}") from None

    lines = [
        f"installed sub-CA {_describe(cert)} (issuer {cert.issuer.rfc4514_string()}, "
        f"valid until {cert.not_valid_after_utc:%Y-%m-%d}) into {certs_dir}",
    ]
    if extra:
        lines.append(f"chain: {len(extra)} certificate(s) sent to clients after the sub-CA")
    if backups:
        lines.append("previous files kept as: " + ", ".join(b.name for b in backups))
    lines += warnings
    lines.append("restart residency-gate to use it; clients must trust your corporate root CA")
    return lines
