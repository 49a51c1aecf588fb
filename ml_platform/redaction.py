"""Secrets out of messages: the one rule that hides the password of a service URL.

Every URL the platform may print, log or record (Redis, MLflow tracking, PostgreSQL for Dagster
or MLflow's backend store) goes through `redact_url` first; `url_secret` names what a URL holds
that must never be printed (the production-profile test searches every log for it).
"""

from __future__ import annotations

from urllib.parse import parse_qsl, unquote, urlencode, urlsplit


def redact_url(url: str) -> str:
    """The URL with its password hidden, for messages and logs: scheme://user:***@host:port/db
    (user shown only when a password follows it), and a `password=` query value as ***."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        host = netloc.rpartition("@")[2]  # what urllib itself takes as the host: after the last '@'
        user = parts.username if parts.password is not None else ""
        netloc = f"{user}:***@{host}"
    elif "@" in url.partition("://")[2]:
        # An unencoded '/', '?' or '#' in the password ends urllib's netloc early: hide all of
        # what precedes the last '@' rather than print part of the password.
        return f"{parts.scheme}://:***@{url.rpartition('@')[2]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k == "password" for k, _ in pairs):
            query = urlencode([(k, "***" if k == "password" else v) for k, v in pairs], safe="*")
    # Not urlunsplit: it drops the empty netloc of unix:///path URLs.
    return (
        f"{parts.scheme}://{netloc}{parts.path}"
        + (f"?{query}" if query else "")
        + (f"#{parts.fragment}" if parts.fragment else "")
    )


def url_secret(url: str | None) -> str | None:
    """The password a URL carries (decoded), from its user info or a `password=` query value; None
    when it has none."""
    if not url:
        return None
    parts = urlsplit(url)
    if "@" in url.partition("://")[2] and parts.password is None and "@" not in parts.netloc:
        # urllib cut the netloc at an unencoded '/', '?' or '#' of the password (see redact_url)
        userinfo = url.partition("://")[2].rpartition("@")[0]
        return unquote(userinfo.partition(":")[2] or userinfo) or None
    if parts.password:
        return unquote(parts.password)
    if parts.username and not parts.password and "@" in parts.netloc:
        # redis://secret@host: redis-py takes a lone user info as the password
        return unquote(parts.username) if urlsplit(url).scheme.startswith(("redis", "unix")) else None
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key == "password" and value:
            return value
    return None


def has_secret(url: str | None) -> bool:
    return url_secret(url) is not None
