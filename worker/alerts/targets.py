"""Where alerts go: RECON_ALERT_WEBHOOKS, parsed. A leaf module (settings import it).

    RECON_ALERT_WEBHOOKS=wecom=https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=…,slack=https://hooks.slack.com/services/…

Entries are separated by commas or white space; each is `FORMAT=URL`, or a bare URL for the
generic JSON format. The URLs carry their bot's key, so nothing here ever puts a URL into an
error message: a target is named by its label (`wecom#1`) instead.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import parse_qsl, unquote, urlsplit


class Format(StrEnum):
    JSON = "json"  # {"kind", "title", "text", "fields", "link", ...}: for your own receiver
    WECOM = "wecom"  # WeCom (企业微信) group robot
    FEISHU = "feishu"  # Feishu / Lark custom bot
    SLACK = "slack"  # Slack incoming webhook


_ALIASES = {"generic": Format.JSON, "lark": Format.FEISHU, "wechat-work": Format.WECOM}
_FORMAT_NAMES = ", ".join(f.value for f in Format)


@dataclass(frozen=True)
class Target:
    format: Format
    url: str
    position: int  # 1-based, in the order configured

    @property
    def label(self) -> str:
        """A name to log and store: the format, its position and a short hash of the URL
        (stable across restarts, changes when the URL does; the hash reveals no key)."""
        digest = hashlib.sha256(self.url.encode()).hexdigest()[:8]
        return f"{self.format.value}#{self.position}:{digest}"

    def __repr__(self) -> str:  # never the URL
        return f"<Target {self.label}>"


def parse_targets(value: str) -> list[Target]:
    """The configured targets; ValueError (naming the entry's position, never its text)."""
    targets: list[Target] = []
    for position, entry in enumerate((e for e in re.split(r"[,\s]+", value) if e), start=1):
        name, sep, url = entry.partition("=")
        if not sep or name.lower().startswith(("http://", "https://")):
            name, url = "json", entry
        fmt = _ALIASES.get(name.lower()) or _format(name.lower())
        if fmt is None:
            raise ValueError(f"entry {position}: unknown format (use one of {_FORMAT_NAMES})")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"entry {position}: not an http(s) URL")
        targets.append(Target(fmt, url, position))
    return targets


def _format(name: str) -> Format | None:
    try:
        return Format(name)
    except ValueError:
        return None


def secret_parts(url: str) -> list[str]:
    """The strings of `url` that must never reach a log: the URL, its query values, its
    password and its last path segment (where Feishu and Slack put the key)."""
    parts = urlsplit(url)
    out = [url]
    out += [v for _k, v in parse_qsl(parts.query, keep_blank_values=False)]
    if parts.password:
        out.append(unquote(parts.password))
    last = parts.path.rstrip("/").rsplit("/", 1)[-1]
    if last:
        out.append(unquote(last))
    return out
