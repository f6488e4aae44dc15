"""Texts the gateway says to people (SMTP replies, notices), zh-CN and English."""

from __future__ import annotations

MESSAGES: dict[str, dict[str, str]] = {
    "conflict.one": {
        "zh-CN": "收件人 {recipient} 是同事 {owners} 的客户（{customer}），您不能给该客户发信",
        "en": "recipient {recipient} is a customer ({customer}) of your colleague {owners}; you may not write to them",
    },
    "conflict.summary": {
        "zh-CN": "发信防冲突：邮件未发送",
        "en": "Send-conflict block: message not sent",
    },
    "queued": {
        "zh-CN": "Ok: queued as {queue_id}",
        "en": "Ok: queued as {queue_id}",
    },
    "queued_held": {
        "zh-CN": "Ok: queued as {queue_id}, held for approval",
        "en": "Ok: queued as {queue_id}, held for approval",
    },
    "queued_split": {
        "zh-CN": "Ok: queued as {queue_id}; the other recipients held for approval as {held_id}",
        "en": "Ok: queued as {queue_id}; the other recipients held for approval as {held_id}",
    },
}


def t(key: str, language: str, **values: object) -> str:
    texts = MESSAGES[key]
    return texts.get(language, texts["en"]).format(**values)
