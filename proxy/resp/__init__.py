"""RESP on the hot path: the request framer, the reply framer and canned replies."""

from proxy.resp.reply import (
    PUSH,
    REPLY,
    SUB_CONFIRM,
    Event,
    ReplyFramer,
    ReplyProtocolError,
    SubConfirm,
)
from proxy.resp.request import (
    LimitExceeded,
    ProtocolError,
    RequestFramer,
    encode_command,
    split_inline,
)

__all__ = [
    "PUSH",
    "REPLY",
    "SUB_CONFIRM",
    "Event",
    "LimitExceeded",
    "ProtocolError",
    "ReplyFramer",
    "ReplyProtocolError",
    "RequestFramer",
    "SubConfirm",
    "encode_command",
    "split_inline",
]
