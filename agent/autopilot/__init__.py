"""The autopilot: a closed-loop controller that keeps a service inside its intent as load and nodes change.

    target.py      the Target protocol (a live server, or the simulator)
    forecast.py    Holt's linear forecaster of the load
    config.py      the knobs (front matter `autopilot:`), checked
    controller.py  Autopilot.tick(): the loop; start reading there
"""
from .config import MODES, AutopilotConfig, AutopilotConfigError
from .controller import Autopilot, Decision
from .forecast import Holt
from .target import Target

__all__ = ["MODES", "Autopilot", "autopilot_for", "AutopilotConfig", "AutopilotConfigError", "Decision", "Holt", "Target"]


def autopilot_for(agent, intent, target=None, config=None, journal=None, **kw) -> Autopilot:
    """Agent.autopilot: an Autopilot with the agent's cluster, policy, model and confirm callback.
    config: an AutopilotConfig, or None for the defaults in the agent's mode (read-only/suggest -> advisory)."""
    from policies import IntentSpec

    from .server_target import target_for
    spec = intent if isinstance(intent, IntentSpec) else agent.parse(intent)
    if config is None:
        config = AutopilotConfig(mode={"confirm": "confirm", "auto": "auto"}.get(agent.mode, "advisory"))
    kw.setdefault("profiles", getattr(agent, "profiles", None))    # the speeds the agent plans with
    confirm = kw.pop("confirm", None) or ((lambda d: bool(agent.confirm(d))) if agent.confirm else None)
    return Autopilot(target or target_for(agent.executor, agent.cluster), spec, agent.policy, agent.model_for(spec),
                     config, journal=journal, confirm=confirm, **kw)
