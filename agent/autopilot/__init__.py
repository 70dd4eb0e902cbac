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

__all__ = ["MODES", "Autopilot", "AutopilotConfig", "AutopilotConfigError", "Decision", "Holt", "Target"]
