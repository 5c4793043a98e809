"""Fixtures for the end-to-end tests: the fake provider, the proxy process, SDK clients.

``start_proxy(overrides)`` writes a residency-gate config that resolves every
provider host to the fake provider and trusts its CA upstream, starts
``residency-gate run -c FILE`` as a separate process, and waits for it to
listen. SDK client factories point the official clients at that proxy the way
a user would: ``HTTPS_PROXY`` plus ``SSL_CERT_FILE`` (the proxy's CA) for the
httpx-based SDKs, ``Config(proxies=...)`` plus ``verify=`` for boto3.
"""

from __future__ import annotations

import copy
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from .fakeprovider import (
    AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY,
    HOSTS,
    FakeProvider,
    free_port,
)

TAG_HEADER = "X-Data-Residency"
PROXY_START_TIMEOUT = 20.0

# Environment variables that would send SDK traffic elsewhere or change trust.
_ENV_TO_CLEAR = (
    "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY",
    "http_proxy", "https_proxy", "all_proxy", "no_proxy",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
    "OPENAI_BASE_URL", "OPENAI_API_KEY", "OPENAI_ORG_ID", "OPENAI_PROJECT_ID",
    "AZURE_OPENAI_ENDPOINT", "AZURE_OPENAI_API_KEY", "OPENAI_API_VERSION",
    "ANTHROPIC_BASE_URL", "ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN",
    "GOOGLE_API_KEY", "GEMINI_API_KEY", "GOOGLE_GENAI_USE_VERTEXAI",
    "GOOGLE_CLOUD_PROJECT", "GOOGLE_CLOUD_LOCATION", "GOOGLE_APPLICATION_CREDENTIALS",
    "GOOGLE_GENAI_API_VERSION", "GOOGLE_GENAI_HTTP_CLIENT",
    "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_BEDROCK_RUNTIME",
    "AWS_CA_BUNDLE", "AWS_REGION", "AWS_DEFAULT_REGION",
)  # fmt: skip


def _bin(name: str) -> Path:
    return Path(sys.executable).parent / name


# The proxy under test: the console script next to this interpreter. E2E_RESIDENCY_GATE
# points the suite at another executable taking the same `run -c FILE` (debugging only).
RESIDENCY_GATE = Path(os.environ.get("E2E_RESIDENCY_GATE") or _bin("residency-gate"))


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


# ---------------------------------------------------------------------------
# the fake provider


@pytest.fixture(scope="session")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeProvider]:
    fp = FakeProvider(tmp_path_factory.mktemp("fakeprovider")).start()
    try:
        yield fp
    finally:
        fp.stop()


@pytest.fixture(autouse=True)
def _fresh_recordings(request: pytest.FixtureRequest) -> None:
    """Each e2e test starts with an empty record of what the fake provider received."""
    if "fake" in request.fixturenames:
        request.getfixturevalue("fake").reset()


# ---------------------------------------------------------------------------
# the proxy process


class Proxy:
    """A running `residency-gate run -c FILE` process."""

    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        self.workdir = workdir
        self.config = config
        host, _, port = str(config["listen"]).rpartition(":")
        self.host, self.port = host, int(port)
        self.config_path = workdir / "residency-gate.yaml"
        self.certs_dir = Path(config["certs_dir"])
        self.audit_dir = Path(config["audit"]["dir"])
        self.stdout_path = workdir / "proxy.stdout.log"
        self.stderr_path = workdir / "proxy.stderr.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ca_pem(self) -> Path:
        return self.certs_dir / "mitmproxy-ca-cert.pem"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_text(self) -> str:
        parts = []
        for p in (self.stdout_path, self.stderr_path):
            if p.exists():
                parts.append(f"--- {p.name} ---\n" + p.read_text(errors="replace"))
        return "\n".join(parts)

    def audit_text(self) -> str:
        if not self.audit_dir.exists():
            return ""
        return "\n".join(
            p.read_text(errors="replace") for p in sorted(self.audit_dir.rglob("*")) if p.is_file()
        )

    def ssl_context(self) -> ssl.SSLContext:
        """A client SSL context that trusts only the proxy's interception CA."""
        return ssl.create_default_context(cafile=str(self.ca_pem))

    def start(self) -> Proxy:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        env = {k: v for k, v in os.environ.items() if k not in _ENV_TO_CLEAR}
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [str(RESIDENCY_GATE), "run", "-c", str(self.config_path)],
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
                env=env,
            )
        deadline = time.monotonic() + PROXY_START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"residency-gate exited with {self.proc.returncode} before listening\n"
                    f"config:\n{self.config_path.read_text()}\n{self.log_text()}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    pass
                if self.ca_pem.exists():
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"residency-gate did not listen on {self.host}:{self.port} within "
                    f"{PROXY_START_TIMEOUT:.0f}s\nconfig:\n{self.config_path.read_text()}\n{self.log_text()}"
                )
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            return None

    def memory_kb(self) -> dict[str, int]:
        """VmRSS / VmHWM of the proxy process (Linux)."""
        out = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, val = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(val.split()[0])
        return out


def base_config(workdir: Path, fake: FakeProvider) -> dict[str, Any]:
    return {
        "listen": f"127.0.0.1:{free_port()}",
        "admin": None,
        "certs_dir": str(workdir / "certs"),
        "upstream_ca": str(fake.ca_pem),
        "resolve": {h: fake.addr for h in HOSTS},
        "audit": {"dir": str(workdir / "audit")},
    }


class ProxyFactory:
    def __init__(self, base: Path, fake: FakeProvider) -> None:
        self.base = base
        self.fake = fake
        self.started: list[Proxy] = []

    def __call__(self, config_overrides: dict[str, Any] | None = None) -> Proxy:
        workdir = self.base / f"proxy{len(self.started)}"
        workdir.mkdir(parents=True, exist_ok=True)
        cfg = deep_merge(base_config(workdir, self.fake), config_overrides or {})
        proxy = Proxy(workdir, cfg)
        self.started.append(proxy)
        return proxy.start()

    def stop_all(self) -> None:
        for p in self.started:
            p.stop()


@pytest.fixture
def start_proxy(tmp_path: Path, fake: FakeProvider) -> Iterator[Callable[..., Proxy]]:
    """Per-test proxies: start_proxy({"residency": {...}}) -> Proxy; stopped at teardown."""
    factory = ProxyFactory(tmp_path, fake)
    yield factory
    factory.stop_all()


@pytest.fixture(scope="module")
def start_module_proxy(
    tmp_path_factory: pytest.TempPathFactory, fake: FakeProvider
) -> Iterator[Callable[..., Proxy]]:
    """Like start_proxy, but the proxies live until the end of the module."""
    factory = ProxyFactory(tmp_path_factory.mktemp("proxy"), fake)
    yield factory
    factory.stop_all()


# ---------------------------------------------------------------------------
# SDK clients


class Target:
    """Where SDK traffic goes: through a proxy, or straight to the fake provider."""

    def __init__(self, proxy: Proxy | None, fake: FakeProvider | None) -> None:
        self.proxy = proxy
        self.fake = fake

    @property
    def ca_pem(self) -> str:
        if self.proxy is not None:
            return str(self.proxy.ca_pem)
        assert self.fake is not None
        return str(self.fake.ca_pem)


@pytest.fixture
def sdk_env(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """sdk_env(proxy) sets HTTPS_PROXY + SSL_CERT_FILE for the httpx-based SDKs.

    sdk_env(None, ca_pem=...) clears proxies and trusts ca_pem only (direct mode).
    """

    def use(proxy: Proxy | None, ca_pem: str | Path | None = None) -> None:
        for name in _ENV_TO_CLEAR:
            monkeypatch.delenv(name, raising=False)
        if proxy is not None:
            monkeypatch.setenv("HTTPS_PROXY", proxy.url)
            monkeypatch.setenv("HTTP_PROXY", proxy.url)
            ca_pem = ca_pem or proxy.ca_pem
        if ca_pem is not None:
            monkeypatch.setenv("SSL_CERT_FILE", str(ca_pem))

    return use


@pytest.fixture
def openai_client(sdk_env: Callable[..., None]) -> Callable[..., Any]:
    """openai_client(proxy, **kw) -> openai.OpenAI going through the proxy (proxy=None: direct)."""
    import openai

    def make(proxy: Proxy | None, *, ca_pem: str | Path | None = None, **kw: Any) -> Any:
        sdk_env(proxy, ca_pem)
        kw.setdefault("api_key", "sk-test-key")
        kw.setdefault("max_retries", 0)
        kw.setdefault("timeout", 30.0)
        return openai.OpenAI(**kw)

    return make


@pytest.fixture
def azure_client(sdk_env: Callable[..., None]) -> Callable[..., Any]:
    """azure_client(proxy, resource, **kw) -> openai.AzureOpenAI for https://{resource}.openai.azure.com."""
    import openai

    def make(proxy: Proxy | None, resource: str, *, ca_pem: str | Path | None = None, **kw: Any) -> Any:
        sdk_env(proxy, ca_pem)
        kw.setdefault("azure_endpoint", f"https://{resource}.openai.azure.com")
        kw.setdefault("api_key", "azure-test-key")
        kw.setdefault("api_version", "2024-10-21")
        kw.setdefault("max_retries", 0)
        kw.setdefault("timeout", 30.0)
        return openai.AzureOpenAI(**kw)

    return make


@pytest.fixture
def anthropic_client(sdk_env: Callable[..., None]) -> Callable[..., Any]:
    import anthropic

    def make(proxy: Proxy | None, *, ca_pem: str | Path | None = None, **kw: Any) -> Any:
        sdk_env(proxy, ca_pem)
        kw.setdefault("api_key", "sk-ant-test")
        kw.setdefault("max_retries", 0)
        kw.setdefault("timeout", 30.0)
        return anthropic.Anthropic(**kw)

    return make


@pytest.fixture
def genai_client(sdk_env: Callable[..., None]) -> Callable[..., Any]:
    """genai_client(proxy, vertexai=False|True, location=..., headers=...) -> google.genai.Client."""
    from google import genai
    from google.genai import types
    from google.oauth2.credentials import Credentials

    def make(
        proxy: Proxy | None,
        *,
        vertexai: bool = False,
        location: str = "europe-west4",
        headers: dict[str, str] | None = None,
        base_url: str | None = None,
        ca_pem: str | Path | None = None,
    ) -> Any:
        sdk_env(proxy, ca_pem)
        opts: dict[str, Any] = {"timeout": 30_000}
        if headers:
            opts["headers"] = headers
        if base_url:
            opts["base_url"] = base_url
        http_options = types.HttpOptions(**opts)
        if vertexai:
            return genai.Client(
                vertexai=True,
                project="p",
                location=location,
                credentials=Credentials(token="test-token"),
                http_options=http_options,
            )
        return genai.Client(api_key="gemini-test-key", http_options=http_options)

    return make


@pytest.fixture
def bedrock_client(sdk_env: Callable[..., None]) -> Callable[..., Any]:
    """bedrock_client(proxy, region) -> boto3 bedrock-runtime client with fixed credentials."""
    import boto3
    from botocore.config import Config

    def make(
        proxy: Proxy | None,
        region: str,
        *,
        endpoint_url: str | None = None,
        ca_pem: str | Path | None = None,
    ) -> Any:
        sdk_env(proxy, ca_pem)
        cfg: dict[str, Any] = {
            "retries": {"max_attempts": 1, "mode": "standard"},
            "connect_timeout": 10,
            "read_timeout": 30,
        }
        if proxy is not None:
            cfg["proxies"] = {"https": proxy.url, "http": proxy.url}
        verify = str(ca_pem or (proxy.ca_pem if proxy is not None else ""))
        session = boto3.session.Session(
            aws_access_key_id=AWS_ACCESS_KEY_ID,
            aws_secret_access_key=AWS_SECRET_ACCESS_KEY,
            region_name=region,
        )
        return session.client(
            "bedrock-runtime",
            endpoint_url=endpoint_url,
            verify=verify or None,
            config=Config(**cfg),
        )

    return make


def tag_bedrock(client: Any, value: str, *, signed: bool) -> None:
    """Add the tag header to every request of a boto3 client.

    signed=True adds it in ``before-sign`` (so SigV4 SignedHeaders covers it);
    signed=False adds it in ``before-send``, after signing (unsigned).
    """

    def add(request: Any, **_: Any) -> None:
        request.headers[TAG_HEADER] = value

    client.meta.events.register("before-sign" if signed else "before-send", add)
