"""A client's local training and evaluation, alone or grouped, and the learning-rate schedule."""
