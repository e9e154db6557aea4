"""Small shared utilities (crash-safe writes, test-only fault injection)."""
