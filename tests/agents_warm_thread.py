"""An agent whose warm-up leaves a thread running: the zygote must refuse to fork."""

from __future__ import annotations

import threading
import time
from typing import Any


def warm_up(options: dict[str, Any]) -> None:
    threading.Thread(target=time.sleep, args=(3600,), name="left-behind", daemon=True).start()


def agent(turn, ctx):  # type: ignore[no-untyped-def]
    ctx.reply(turn.text)
