"""Learners: the torch learner (single process) and, later, DeepSpeed ZeRO learners."""
