"""Ray jobs: semantic and collaborative encoders, SC encoder + RQ-VAEs, SCID assignment."""
