"""What runs once per checkpoint: read it, tell its variant, export it, choose and prove the
runtime, and write the model files and metadata the archive ships. Never shipped itself."""
