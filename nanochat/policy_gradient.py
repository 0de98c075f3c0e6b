"""
The policy-gradient pieces of RL on tasks with a checkable answer (a simplified GRPO: no KL term, no ratio
clipping, strictly on-policy): a reward per sampled completion, the group-relative advantage, and the loss
over the sampled tokens only. Batches of samples are built with conversation_loader.collate_supervised,
whose targets are -1 wherever the engine's mask is 0 (prompt, forced tool output) and on padding.
"""


def reward_of(task, conversation, completion):
    """1.0 for a correct final answer, else 0.0 (task.reward if the task defines one)."""
    fn = getattr(task, "reward", None) or task.evaluate
    return float(fn(conversation, completion))


def group_advantages(rewards):
    """rewards (N,) of one prompt's group -> reward - group mean (no std normalisation)."""
    return rewards - rewards.mean()


def policy_gradient_loss(logprobs, targets, advantages, num_valid):
    """logprobs (N, T) of the target tokens, advantages (N,): -sum(adv * logp over sampled tokens) /
    num_valid, i.e. minus the mean over all sampled tokens of the group."""
    valid = (targets >= 0).float()
    return -(logprobs * valid * advantages.unsqueeze(1)).sum() / max(num_valid, 1)
