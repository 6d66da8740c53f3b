"""rewards: verifiers, their registry, and fault-tolerant execution. Usable without torch or rlkit.

>>> import rewards
>>> rewards.resolve("math")(["\\\\boxed{4}"], answer=["4"])
[1.0]
"""

from rewards import code, format, gym, math  # noqa: F401  (register the built-in verifiers)
from rewards.manager import RewardManager, VerifierSpec
from rewards.registry import completion_text, list_rewards, load_plugins, resolve, reward

__all__ = [
    "RewardManager",
    "VerifierSpec",
    "completion_text",
    "list_rewards",
    "load_plugins",
    "resolve",
    "reward",
]
