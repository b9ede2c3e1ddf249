"""One alert as the JSON body each webhook format expects."""

from __future__ import annotations

from typing import Any

from worker.alerts.events import Alert, Severity
from worker.alerts.targets import Format

# WeCom refuses markdown over 4096 bytes, Feishu text over ~30 KB, Slack section text over
# 3000 characters; a digest is far shorter, but a long failure reason must not lose a message.
_MAX_CHARS = 3000
_ICON = {Severity.CRITICAL: "🔴", Severity.WARNING: "🟠", Severity.INFO: "🔵"}


def _cap(text: str) -> str:
    return text if len(text) <= _MAX_CHARS else text[: _MAX_CHARS - 15] + "...(truncated)"


def render(alert: Alert, fmt: Format) -> dict[str, Any]:
    """The request body for `fmt`."""
    title = f"{_ICON[alert.severity]} [midas-recon] {alert.title}"
    if fmt is Format.JSON:
        return {
            "source": "midas-recon",
            "kind": alert.kind.value,
            "key": alert.key,
            "severity": alert.severity.value,
            "title": alert.title,
            "text": _cap(alert.text()),
            "lines": list(alert.lines),
            "link": alert.link,
            "facts": alert.facts,
        }
    if fmt is Format.WECOM:
        body = "\n".join(f"> {line}" for line in alert.lines)
        link = f"\n[Open]({alert.link})" if alert.link else ""
        return {"msgtype": "markdown", "markdown": {"content": _cap(f"**{title}**\n{body}{link}")}}
    if fmt is Format.FEISHU:
        text = "\n".join([title, *alert.lines, *([alert.link] if alert.link else [])])
        return {"msg_type": "text", "content": {"text": _cap(text)}}
    if fmt is Format.SLACK:
        body = "\n".join(alert.lines) or " "
        if alert.link:
            body += f"\n<{alert.link}|Open>"
        return {
            "text": _cap(f"{title}\n{body}"),  # the notification's text, and the fallback
            "blocks": [
                {"type": "header", "text": {"type": "plain_text", "text": title[:150]}},
                {"type": "section", "text": {"type": "mrkdwn", "text": _cap(body)}},
            ],
        }
    raise ValueError(f"unknown format {fmt}")
