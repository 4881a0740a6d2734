"""Levels 2 and 3: multi-task SFT and progressive Softmax-DPO on a backbone LLM with SCID tokens."""
