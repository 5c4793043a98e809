"""`residency-gate ca ...`: export the interception CA, write a PAC file, install a sub-CA.

    residency-gate ca export [--format pem|der] [--out FILE] [--certs-dir DIR]
    residency-gate ca pac --proxy HOST:PORT [--out FILE]
    residency-gate ca install-subca --cert CERT.pem --key KEY.pem [--chain CHAIN.pem] [--force]

The certs directory is ``--certs-dir``, else ``args.default_certs_dir`` (set by
the main CLI from the config's ``certs_dir``), else ``./certs``; its files are
described in ``ops/ca.py``.

Bad input is reported as one line on stderr with exit status 1 or 2; never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..fileio import write_atomic
from ..ops.ca import CaError, install_subca, load_or_create_ca

__all__ = ["register"]


def register(subparsers) -> None:
    """Add the ``ca`` command (with export, pac, install-subca) to an argparse subparsers object."""
    ca = subparsers.add_parser(
        "ca",
        help="interception CA: export it, write a PAC file, install a corporate sub-CA",
        description="Manage the interception CA in certs_dir (mitmproxy's file names).",
    )
    ca_sub = ca.add_subparsers(dest="ca_command", metavar="{export,pac,install-subca}")
    ca_sub.required = True

    def config_opt(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "-c",
            "--config",
            metavar="FILE",
            help="config file (default ./residency-gate.yaml, else built-in defaults)",
        )

    def certs_opt(p: argparse.ArgumentParser) -> None:
        config_opt(p)
        p.add_argument(
            "--certs-dir",
            dest="certs_dir",
            default=None,
            help="certs directory (default: certs_dir from the config, else ./certs)",
        )

    exp = ca_sub.add_parser(
        "export",
        help="write the CA certificate clients must trust (created if missing)",
        description="Write the interception CA certificate (never the key). "
        "The CA is created, as mitmproxy would, if it does not exist yet.",
    )
    exp.add_argument("--format", choices=("pem", "der"), default="pem", help="default: pem")
    exp.add_argument("--out", "-o", default=None, help="output file (default: stdout)")
    certs_opt(exp)
    exp.set_defaults(func=cmd_export)

    pac = ca_sub.add_parser(
        "pac",
        help="write a PAC file sending only catalog hosts through the proxy",
        description="Write a proxy auto-config file: catalog hosts -> PROXY HOST:PORT, "
        "everything else DIRECT.",
    )
    pac.add_argument(
        "--proxy",
        required=True,
        help="HOST:PORT clients use to reach the proxy (comma-separate several for failover)",
    )
    pac.add_argument("--out", "-o", default=None, help="output file (default: stdout)")
    config_opt(pac)
    pac.set_defaults(func=cmd_pac)

    sub = ca_sub.add_parser(
        "install-subca",
        help="use a corporate sub-CA (cert + key) instead of the generated CA",
        description="Install a CA certificate and its private key as the interception CA. "
        "The certificate must be a CA (basicConstraints CA:TRUE) and match the key. "
        "Restart residency-gate afterwards.",
    )
    sub.add_argument(
        "--cert", required=True, help="PEM (or DER) certificate; may be followed by its chain"
    )
    sub.add_argument(
        "--key", required=True, help="PEM (or DER) private key, unencrypted, RSA or EC"
    )
    sub.add_argument(
        "--chain",
        default=None,
        help="PEM file with intermediate certificates sent to clients after the sub-CA",
    )
    sub.add_argument(
        "--force",
        action="store_true",
        help="replace an existing CA (the old files are kept with a .bak suffix)",
    )
    certs_opt(sub)
    sub.set_defaults(func=cmd_install_subca)


# ---------------------------------------------------------------------------
# helpers


def _certs_dir(args: argparse.Namespace) -> Path:
    d = getattr(args, "certs_dir", None) or getattr(args, "default_certs_dir", None) or "certs"
    return Path(d)


def _fail(message: str, code: int = 1) -> int:
    print(f"residency-gate ca: {message}", file=sys.stderr)
    return code


def _write_output(out: str | None, data: bytes, *, binary: bool) -> None:
    if out is None or out == "-":
        if binary and sys.stdout.isatty():
            raise CaError("refusing to write DER to a terminal; use --out FILE")
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    path = Path(out)
    try:
        write_atomic(path, data, mode=0o644)
    except OSError as e:
        raise CaError(f"cannot write {path}: {e.strerror or e}") from None





# ---------------------------------------------------------------------------
# commands


def cmd_export(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import serialization

    try:
        store = load_or_create_ca(_certs_dir(args), getattr(args, "default_ca_names", None))
        cert = store.default_ca.to_cryptography()
        if args.format == "der":
            data = cert.public_bytes(serialization.Encoding.DER)
        else:
            data = cert.public_bytes(serialization.Encoding.PEM)
        _write_output(args.out, data, binary=args.format == "der")
    except CaError as e:
        return _fail(str(e))
    if args.out and args.out != "-":
        print(
            f"wrote {args.out} ({args.format.upper()}, {cert.subject.rfc4514_string()})",
            file=sys.stderr,
        )
    return 0


def cmd_pac(args: argparse.Namespace) -> int:
    from ..ops.pac import pac_file, proxy_directive

    try:
        proxy_directive(args.proxy)
    except ValueError as e:
        return _fail(str(e), 2)
    provider = getattr(args, "catalog_host_patterns", None)
    if not callable(provider):
        return _fail("the catalog's host list is not available")
    try:
        patterns = list(provider())
    except SystemExit:
        raise
    except Exception as e:
        return _fail(f"cannot load the catalog: {e}")
    try:
        text = pac_file(patterns, args.proxy)
        _write_output(args.out, text.encode("utf-8"), binary=False)
    except ValueError as e:
        return _fail(f"catalog host pattern: {e}")
    except CaError as e:
        return _fail(str(e))
    if args.out and args.out != "-":
        print(f"wrote {args.out} ({len(patterns)} host patterns -> {args.proxy})", file=sys.stderr)
    return 0


def cmd_install_subca(args: argparse.Namespace) -> int:
    try:
        written = install_subca(
            _certs_dir(args),
            Path(args.cert),
            Path(args.key),
            chain=Path(args.chain) if args.chain else None,
            force=args.force,
        )
    except CaError as e:
        return _fail(str(e))
    for line in written:
        print(line)
    return 0


