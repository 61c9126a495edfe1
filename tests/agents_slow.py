"""An agent whose module takes 30 s to import: the zygote is still loading it while the
test signals a starting supervisor."""

from __future__ import annotations

import time

time.sleep(30)


def agent(turn, ctx):  # type: ignore[no-untyped-def]
    ctx.reply(turn.text)
