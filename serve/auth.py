"""Who may call the API: the bearer token a deployment requires, decided once, failing closed.

``api_token(serve_config)`` is the one decision, made by the deploying driver (before Serve binds
anything), by ``build_app`` (a RayService's application build) and by every replica: the token the
API requires, or None for no auth, or a ``ValueError`` that stops the start. The rules
(serve.auth):

- 'auto' (default): a token when one is set (serve.auth_token_file, else the env var named by
  serve.auth_token_env); without one, only a loopback bind may start. A bind beyond loopback
  (0.0.0.0, a pod IP) without a token refuses to start: an open scoring API on the network is
  never the silent default.
- 'token': a token is required on any bind.
- 'none': no auth on any bind, said explicitly (behind a gateway that authenticates).

A token that is a known placeholder (CHANGE-ME as in secrets.example.yaml, changeme, password,
...) or shorter than ``MIN_TOKEN_CHARS`` is refused: a copied example Secret must not become the
production credential. Messages never echo the token.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping

from embsum.client import read_token
from embsum.config import ServeConfig

MIN_TOKEN_CHARS = 16
# Compared after lower-casing and dropping everything but letters and digits ("CHANGE-ME" -> "changeme").
_PLACEHOLDER_WORDS = ("changeme", "replaceme", "placeholder", "yourtoken", "insertoken", "inserttoken",
                      "redacted", "notasecret", "dummy", "example")
_PLACEHOLDER_EXACT = {"token", "apitoken", "secret", "password", "passw0rd", "test", "testtoken", "default", "admin",
                      "none", "null", "xxxxxxxxxxxxxxxx", "0000000000000000", "1234567890123456"}
_LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback")


def is_loopback(host: str) -> bool:
    """True only for addresses that cannot be reached from another machine (127.0.0.0/8, ::1,
    localhost). '0.0.0.0', '::' and '' bind every interface."""
    name = host.strip().strip("[]").lower()
    if name in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # a host name or interface address: reachable from elsewhere


def token_source(s: ServeConfig) -> str:
    return f"serve.auth_token_file={s.auth_token_file!r}" if s.auth_token_file else f"env {s.auth_token_env}"


def check_token(token: str, source: str) -> None:
    """Refuse placeholders and short tokens (ValueError naming where the token came from)."""
    folded = re.sub(r"[^a-z0-9]", "", token.lower())
    placeholder = folded in _PLACEHOLDER_EXACT or any(w in folded for w in _PLACEHOLDER_WORDS)
    if placeholder:
        raise ValueError(f"the API token from {source} is a placeholder value; set a random token (e.g. "
                         f"`openssl rand -hex 32`)")
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"the API token from {source} has {len(token)} characters; at least {MIN_TOKEN_CHARS} "
                         f"are required (e.g. `openssl rand -hex 32`)")


def api_token(s: ServeConfig, environ: Mapping[str, str] | None = None) -> str | None:
    """The bearer token the API requires, None for no auth, or ValueError: refuse to start."""
    if s.auth == "none":
        return None
    token = read_token(s, environ)
    if token is None:
        if s.auth == "token":
            raise ValueError(f"serve.auth='token' but no API token is set ({token_source(s)} is empty)")
        if not is_loopback(s.host):
            raise ValueError(f"serve.host={s.host!r} binds beyond loopback and no API token is set "
                             f"({token_source(s)} is empty): refusing to serve the API without auth. Set a "
                             f"token, or serve.auth=none to serve without auth behind a gateway that authenticates")
        return None
    check_token(token, token_source(s))
    return token
