"""Data: manifests, conversations, interleaving, behaviors, joint SFT types, batching and the feature cache."""
