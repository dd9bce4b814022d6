"""What runs beside a live server: deploy and rollout, keys, health, the memory budget, restarts.
Never shipped in the archive."""
