"""What it takes to run hotlab for real: service units, broker configuration for a site."""
