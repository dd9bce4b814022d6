"""What an operator runs beside the server: checkpoint export, deploy and rollout, keys, the
client, the health check. Never shipped in the archive."""
