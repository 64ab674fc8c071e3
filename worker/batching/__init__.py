"""Dynamic batching in front of a whole-batch engine: the policy and the model thread."""
