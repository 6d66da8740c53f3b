"""Ray actors, placement and weight sync."""
