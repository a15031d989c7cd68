"""Real deployment: credentials, the Flower commands for every machine, start-up measurement."""
