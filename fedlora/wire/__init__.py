"""What travels between server and clients: the message layout and the base store."""
