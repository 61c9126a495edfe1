"""Load an agent the way the zygote does and check its options before any turn.

An agent may declare its options: give the callable a `check_options` attribute, a
function that takes the `[agent.options]` table and raises (ValueError, TypeError or
TurnError) with a message that names the key, e.g. "agent.options.model is not set".
The openai agent does. `corral config check` and the zygote's start both call
`check_agent`, so a typo in an option fails `serve` at start, not at the first message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from corral.worker.runtime import Agent, AgentLoadError, load_agent

OptionsCheck = Callable[[dict[str, Any]], object]


def options_check(agent: Agent) -> OptionsCheck | None:
    """The agent's declared options check, if it has one."""
    check = getattr(agent, "check_options", None)
    return check if callable(check) else None


def check_agent(entrypoint: str, options: dict[str, Any]) -> Agent:
    """Import the entrypoint, find its callable, check its options; AgentLoadError naming
    the key (agent.entrypoint or agent.options...) otherwise."""
    try:
        agent = load_agent(entrypoint)
    except AgentLoadError as e:
        raise AgentLoadError(f"agent.entrypoint: {e}") from None
    check = options_check(agent)
    if check is not None:
        try:
            check(options)
        except Exception as e:  # the agent's own words; they name the key
            message = str(e) or type(e).__name__
            if not message.startswith("agent."):
                message = f"agent.options: {message}"
            raise AgentLoadError(message) from None
    return agent
