"""Data: loading a dataset, partitioning it over clients, encoding examples as model inputs."""
