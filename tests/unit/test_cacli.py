"""`residency-gate ca export | pac | install-subca`."""

from __future__ import annotations

import argparse
import datetime
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from residency_gate.cli import ca as cacli
from residency_gate.ops import ca as ca_files


@pytest.fixture(autouse=True)
def small_keys(monkeypatch):
    # generated CAs only need to exist here; 1024-bit RSA keeps the tests fast
    monkeypatch.setattr(ca_files, "KEY_SIZE", 1024)


def parse(argv: list[str], **defaults) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="residency-gate")
    sub = parser.add_subparsers(dest="command")
    cacli.register(sub)
    args = parser.parse_args(argv)
    for k, v in defaults.items():
        setattr(args, k, v)
    return args


def run(argv: list[str], **defaults) -> int:
    args = parse(argv, **defaults)
    return args.func(args)


# --------------------------------------------------------------------------- PKI helpers

NOW = datetime.datetime.now(datetime.UTC)


def make_cert(
    subject: str,
    key,
    issuer_name: str | None = None,
    issuer_key=None,
    *,
    ca: bool | None = True,
    key_cert_sign: bool | None = True,
    not_after: datetime.datetime | None = None,
):
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name or subject)])
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(days=1))
        .not_valid_after(not_after or NOW + datetime.timedelta(days=365))
    )
    if ca is not None:
        b = b.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    if key_cert_sign is not None:
        b = b.add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=key_cert_sign,
                crl_sign=key_cert_sign, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
    return b.sign(issuer_key or key, hashes.SHA256())


def pem(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key, password: bytes | None = None) -> bytes:
    enc = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)


@pytest.fixture
def pki(tmp_path):
    """A corporate root and a sub-CA it issued, as files."""
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = make_cert("Corp Root CA", root_key)
    sub_key = ec.generate_private_key(ec.SECP256R1())
    sub = make_cert("Corp Egress Sub-CA", sub_key, "Corp Root CA", root_key)
    d = tmp_path / "pki"
    d.mkdir()
    (d / "root.pem").write_bytes(pem(root))
    (d / "sub.pem").write_bytes(pem(sub))
    (d / "sub.key").write_bytes(key_pem(sub_key))
    return {"dir": d, "root": root, "root_key": root_key, "sub": sub, "sub_key": sub_key}


# --------------------------------------------------------------------------- export


def test_export_creates_the_ca_like_mitmproxy_and_prints_pem(tmp_path, capsys):
    certs = tmp_path / "certs"
    assert run(["ca", "export", "--certs-dir", str(certs)]) == 0
    out, err = capsys.readouterr()
    cert = x509.load_pem_x509_certificate(out.encode())
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert "created a new interception CA" in err
    for name in ("mitmproxy-ca.pem", "mitmproxy-ca-cert.pem", "mitmproxy-ca-cert.cer",
                 "mitmproxy-ca-cert.p12", "mitmproxy-ca.p12", "mitmproxy-dhparam.pem"):
        assert (certs / name).exists(), name
    assert (certs / "mitmproxy-ca-cert.pem").read_bytes() == out.encode()
    # second export: same CA, not recreated
    assert run(["ca", "export", "--certs-dir", str(certs)]) == 0
    out2, err2 = capsys.readouterr()
    assert out2 == out and "created" not in err2


def test_export_der_to_file_and_default_certs_dir(tmp_path, capsys):
    certs = tmp_path / "from-config"
    out_file = tmp_path / "ca.der"
    rc = run(["ca", "export", "--format", "der", "--out", str(out_file)],
             default_certs_dir=certs)
    assert rc == 0
    cert = x509.load_der_x509_certificate(out_file.read_bytes())
    pem_cert = x509.load_pem_x509_certificate((certs / "mitmproxy-ca-cert.pem").read_bytes())
    assert cert == pem_cert
    assert "wrote" in capsys.readouterr().err


def test_export_defaults_to_certs_in_cwd(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run(["ca", "export"]) == 0
    assert (tmp_path / "certs" / "mitmproxy-ca.pem").exists()


def test_export_unusable_certs_dir_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    assert run(["ca", "export", "--certs-dir", str(blocker / "certs")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("residency-gate ca:")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "mitmproxy-ca.pem").write_text("garbage")
    assert run(["ca", "export", "--certs-dir", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "cannot load the CA" in err and "Traceback" not in err


# --------------------------------------------------------------------------- pac


def test_pac_uses_the_catalog_host_patterns(tmp_path, capsys):
    calls = []

    def patterns():
        calls.append(1)
        return ["api.openai.com", "{resource}.openai.azure.com"]

    out = tmp_path / "proxy.pac"
    rc = run(["ca", "pac", "--proxy", "gw.corp:8080", "--out", str(out)],
             catalog_host_patterns=patterns)
    assert rc == 0 and calls == [1]
    text = out.read_text()
    assert "FindProxyForURL" in text and '"PROXY gw.corp:8080"' in text
    assert '"api.openai.com": 1' in text
    # stdout
    assert run(["ca", "pac", "--proxy", "gw.corp:8080"], catalog_host_patterns=patterns) == 0
    assert capsys.readouterr().out == text


def test_pac_errors_are_one_line(capsys):
    def broken():
        raise ValueError("catalog/providers/x.yaml:3: bad")

    assert run(["ca", "pac", "--proxy", "nope"], catalog_host_patterns=list) == 2
    assert run(["ca", "pac", "--proxy", "gw:1"], catalog_host_patterns=broken) == 1
    assert run(["ca", "pac", "--proxy", "gw:1"]) == 1  # no host list wired in
    assert run(["ca", "pac", "--proxy", "gw:1"], catalog_host_patterns=lambda: ["a b"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "x.yaml:3: bad" in err
    assert len(err.strip().splitlines()) == 4


def test_ca_subcommand_is_required():
    with pytest.raises(SystemExit):
        parse(["ca"])


# --------------------------------------------------------------------------- install-subca


def installed(certs):
    from mitmproxy.certs import CertStore

    return CertStore.from_store(certs, "mitmproxy", 1024)


def test_install_subca_as_mitmproxy_expects(tmp_path, pki, capsys):
    certs = tmp_path / "certs"
    d = pki["dir"]
    rc = run(["ca", "install-subca", "--cert", str(d / "sub.pem"), "--key", str(d / "sub.key"),
              "--chain", str(d / "root.pem"), "--certs-dir", str(certs)])
    assert rc == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "Corp Egress Sub-CA" in out and "restart residency-gate" in out

    combined = (certs / "mitmproxy-ca.pem").read_bytes()
    assert combined.index(b"PRIVATE KEY") < combined.index(b"BEGIN CERTIFICATE")
    assert stat.S_IMODE((certs / "mitmproxy-ca.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE((certs / "mitmproxy-ca.p12").stat().st_mode) == 0o600
    assert (certs / "mitmproxy-ca-cert.pem").read_bytes() == pem(pki["sub"])
    assert (certs / "mitmproxy-ca-cert.cer").read_bytes() == pem(pki["sub"])
    from cryptography.hazmat.primitives.serialization import pkcs12

    p12 = pkcs12.load_key_and_certificates((certs / "mitmproxy-ca-cert.p12").read_bytes(), None)
    # a certificate-only PKCS#12 (as mitmproxy writes it): no key, the sub-CA inside
    assert p12[0] is None and pki["sub"] in [p12[1], *p12[2]]
    p12 = pkcs12.load_key_and_certificates((certs / "mitmproxy-ca.p12").read_bytes(), None)
    assert p12[0] is not None and p12[1] == pki["sub"] and p12[2] == [pki["root"]]
    assert (certs / "mitmproxy-dhparam.pem").exists()

    # mitmproxy uses it: leaf certificates are issued by the sub-CA, chain included
    store = installed(certs)
    assert store.default_ca.to_cryptography() == pki["sub"]
    entry = store.get_cert("api.openai.com", [])
    leaf = entry.cert.to_cryptography()
    leaf.verify_directly_issued_by(pki["sub"])
    chain = [c.to_cryptography() for c in entry.chain_certs]
    assert chain[:2] == [pki["sub"], pki["root"]]

    # export now gives the sub-CA certificate
    assert run(["ca", "export", "--certs-dir", str(certs)]) == 0
    assert capsys.readouterr().out.encode() == pem(pki["sub"])


def test_install_subca_refuses_to_replace_without_force(tmp_path, pki, capsys):
    certs = tmp_path / "certs"
    assert run(["ca", "export", "--certs-dir", str(certs)]) == 0
    old = (certs / "mitmproxy-ca.pem").read_bytes()
    capsys.readouterr()
    d = pki["dir"]
    argv = ["ca", "install-subca", "--cert", str(d / "sub.pem"), "--key", str(d / "sub.key"),
            "--certs-dir", str(certs)]
    assert run(argv) == 1
    err = capsys.readouterr().err
    assert "already exists" in err and "--force" in err
    assert (certs / "mitmproxy-ca.pem").read_bytes() == old
    assert run([*argv, "--force"]) == 0
    assert (certs / "mitmproxy-ca.pem.bak").read_bytes() == old
    assert installed(certs).default_ca.to_cryptography() == pki["sub"]


def test_install_subca_cert_file_with_chain_appended(tmp_path, pki):
    d = pki["dir"]
    (d / "bundle.pem").write_bytes(pem(pki["sub"]) + pem(pki["root"]))
    certs = tmp_path / "certs"
    rc = run(["ca", "install-subca", "--cert", str(d / "bundle.pem"), "--key", str(d / "sub.key"),
              "--certs-dir", str(certs)])
    assert rc == 0
    store = installed(certs)
    assert [c.to_cryptography() for c in store.default_chain_certs] == [pki["sub"], pki["root"]]


def bad_install(tmp_path, capsys, cert_bytes, key_bytes) -> str:
    d = tmp_path / "bad"
    d.mkdir(exist_ok=True)
    (d / "c.pem").write_bytes(cert_bytes)
    (d / "k.pem").write_bytes(key_bytes)
    certs = tmp_path / "certs"
    rc = run(["ca", "install-subca", "--cert", str(d / "c.pem"), "--key", str(d / "k.pem"),
              "--certs-dir", str(certs)])
    err = capsys.readouterr().err
    assert rc == 1
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert not (certs / "mitmproxy-ca.pem").exists()
    return err


def test_install_subca_refuses_a_leaf_certificate(tmp_path, pki, capsys):
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = make_cert("proxy.corp", key, "Corp Root CA", pki["root_key"], ca=False,
                     key_cert_sign=False)
    err = bad_install(tmp_path, capsys, pem(leaf), key_pem(key))
    assert "not a CA certificate" in err and "CA:TRUE" in err


def test_install_subca_refuses_missing_basic_constraints(tmp_path, capsys):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = make_cert("no bc", key, ca=None)
    err = bad_install(tmp_path, capsys, pem(cert), key_pem(key))
    assert "basicConstraints" in err


def test_install_subca_refuses_ca_without_keycertsign(tmp_path, capsys):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = make_cert("no sign", key, key_cert_sign=False)
    assert "keyCertSign" in bad_install(tmp_path, capsys, pem(cert), key_pem(key))


def test_install_subca_refuses_a_key_that_does_not_match(tmp_path, pki, capsys):
    other = ec.generate_private_key(ec.SECP256R1())
    err = bad_install(tmp_path, capsys, pem(pki["sub"]), key_pem(other))
    assert "does not match" in err


def test_install_subca_refuses_expired(tmp_path, capsys):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = make_cert("old", key, not_after=NOW - datetime.timedelta(hours=1))
    assert "expired" in bad_install(tmp_path, capsys, pem(cert), key_pem(key))


def test_install_subca_warns_when_expiring_soon(tmp_path, capsys):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = make_cert("soon", key, not_after=NOW + datetime.timedelta(days=5))
    d = tmp_path / "p"
    d.mkdir()
    (d / "c.pem").write_bytes(pem(cert))
    (d / "k.pem").write_bytes(key_pem(key))
    rc = run(["ca", "install-subca", "--cert", str(d / "c.pem"), "--key", str(d / "k.pem"),
              "--certs-dir", str(tmp_path / "certs")])
    assert rc == 0
    assert "warning: the sub-CA expires" in capsys.readouterr().out


def test_install_subca_bad_files(tmp_path, pki, capsys):
    sub = pem(pki["sub"])
    sub_key = key_pem(pki["sub_key"])
    assert "encrypted" in bad_install(tmp_path, capsys, sub, key_pem(pki["sub_key"], b"pw"))
    assert "not a PEM or DER" in bad_install(tmp_path, capsys, b"hello", sub_key)
    assert "not a readable private key" in bad_install(tmp_path, capsys, sub, b"hello")
    assert "certificate, not a private key" in bad_install(tmp_path, capsys, sub, sub)
    ed = ed25519.Ed25519PrivateKey.generate()
    assert "not supported" in bad_install(tmp_path, capsys, sub, key_pem(ed))
    rc = run(["ca", "install-subca", "--cert", str(tmp_path / "missing.pem"),
              "--key", str(tmp_path / "missing.key"), "--certs-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert rc == 1 and "no such file" in err and "Traceback" not in err


def test_install_subca_accepts_der_files(tmp_path, pki):
    d = pki["dir"]
    (d / "sub.der").write_bytes(pki["sub"].public_bytes(serialization.Encoding.DER))
    (d / "sub.key.der").write_bytes(pki["sub_key"].private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    certs = tmp_path / "certs"
    rc = run(["ca", "install-subca", "--cert", str(d / "sub.der"),
              "--key", str(d / "sub.key.der"), "--certs-dir", str(certs)])
    assert rc == 0
    assert installed(certs).default_ca.to_cryptography() == pki["sub"]


# --------------------------------------------------------------------------- the real CLI


def test_wired_into_the_main_cli(tmp_path, monkeypatch, capsys):
    """`residency-gate ca ...` through the main entry point, with the config's certs_dir."""
    try:
        from residency_gate.cli import main
    except ImportError:  # pragma: no cover
        pytest.skip("cli not available")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "residency-gate.yaml").write_text("certs_dir: mycerts\n")
    assert main(["ca", "export"]) == 0
    assert (tmp_path / "mycerts" / "mitmproxy-ca-cert.pem").exists()
    capsys.readouterr()
    assert main(["ca", "pac", "--proxy", "127.0.0.1:8080"]) == 0
    text = capsys.readouterr().out
    assert '"api.openai.com": 1' in text
