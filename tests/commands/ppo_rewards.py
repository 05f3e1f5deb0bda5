"""Python reward functions for the PPO tests (named as `tests.commands.ppo_rewards:NAME` in configs)."""


def ascii_letters(prompts, responses, metadata):
    """The share of a response's characters that are ASCII letters: about 0.2 for a random byte-level policy."""
    return [sum(c.isascii() and c.isalpha() for c in response) / max(len(response), 1) for response in responses]
