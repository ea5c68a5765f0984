"""The learner: advantages over rollout trees (`advantage`), training rows and micro-batches (`batch`),
the policy loss (`loss`, `forward`), and the DeepSpeed training engine (`engine.Learner`)."""
